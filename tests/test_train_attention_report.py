"""Training forbids the silent flex -> dense attention fallback (unless opted in) and writes
used_backends() into metrics.jsonl."""
import json

import pytest

from ivfast.config import load_config
from ivfast.models import attention as A
from ivfast.trainer import Trainer


def _cfg(clip_list, out, *extra):
    return load_config("demo", [f"data.train_list={clip_list}", "demo=false", f"runtime.output_dir={out}",
                                "optim.batch_per_gpu=2", "optim.global_batch=2", "optim.epochs=1",
                                "runtime.log_every=1", "runtime.max_steps=1", *extra])


def test_training_reports_backends_and_forbids_dense_fallback(clip_list, tmp_path):
    try:
        Trainer(_cfg(clip_list, tmp_path / "b", "model.attn_allow_dense_fallback=true"))
        assert A._allow_dense_fallback is True
        trainer = Trainer(_cfg(clip_list, tmp_path / "a"))
        assert A._allow_dense_fallback is False, "training must turn the dense fallback into an error"
        trainer.fit()
    finally:
        A.set_dense_fallback(True)
    rec = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    backends = rec["attention_backends"]
    assert isinstance(backends, dict) and backends, rec
    assert all(isinstance(v, str) and v for v in backends.values())
