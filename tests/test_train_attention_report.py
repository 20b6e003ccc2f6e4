"""Training forbids the silent flex -> dense attention fallback (unless opted in) and writes
used_backends() into metrics.jsonl."""
import json

import pytest

from ivfast.models import attention as A
from ivfast.trainer import Trainer
from utils import tiny_cfg


def test_training_reports_backends_and_forbids_dense_fallback(clip_list, tmp_path):
    try:
        Trainer(tiny_cfg(clip_list, tmp_path / "b", "runtime.max_steps=1", "model.attn_allow_dense_fallback=true"))
        assert A._allow_dense_fallback is True
        trainer = Trainer(tiny_cfg(clip_list, tmp_path / "a", "runtime.max_steps=1"))
        assert A._allow_dense_fallback is False, "training must turn the dense fallback into an error"
        trainer.fit()
    finally:
        A.set_dense_fallback(True)
    rec = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    backends = rec["attention_backends"]
    assert isinstance(backends, dict) and backends, rec
    assert all(isinstance(v, str) and v for v in backends.values())
