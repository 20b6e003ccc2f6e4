"""ivfast.masking on a bare source tree (ivfast._C never built): one warning, the NumPy reference,
bit-equal masks. The GPU test machine gets exactly such a tree."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ivfast import masking

# Run in a fresh interpreter with ivfast._C hidden: sys.modules[name] = None makes every import of it
# raise ImportError, as on a machine where the extension was never compiled.
_CHILD = textwrap.dedent("""
    import json, sys, warnings
    sys.modules["ivfast._C"] = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from ivfast import masking
        out = {"has_C": masking._C is not None, "tube": [], "block": []}
        for seed in range(4):
            k, m = masking.tube_mask(3, 4, 6, 5, 0.75, seed)
            out["tube"].append([k.tolist(), m.tolist(), str(k.dtype)])
            k, m, p = masking.multiblock_mask(3, 4, 8, 8, 4, (0.15, 0.2), (1.0, 1.0), seed=seed,
                                              max_keep=40, with_pred=True)
            out["block"].append([k.tolist(), m.tolist(), p.tolist(), str(k.dtype)])
    out["warnings"] = [str(w.message) for w in caught if "ivfast._C" in str(w.message)]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def child():
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_without_C_warns_once_and_uses_reference(child):
    assert not child["has_C"]
    assert len(child["warnings"]) == 1, child["warnings"]
    assert "NumPy reference" in child["warnings"][0] and "pip install" in child["warnings"][0]


@pytest.mark.skipif(masking._C is None, reason="this interpreter has no ivfast._C to compare against")
def test_without_C_masks_equal_the_cpp_path(child):
    for seed, (k, m, dt) in enumerate(child["tube"]):
        ck, cm = masking.tube_mask(3, 4, 6, 5, 0.75, seed)
        assert dt == str(ck.dtype) == "int32"
        assert np.array_equal(np.array(k), ck) and np.array_equal(np.array(m), cm), f"tube seed {seed}"
    for seed, (k, m, p, dt) in enumerate(child["block"]):
        ck, cm, cp = masking.multiblock_mask(3, 4, 8, 8, 4, (0.15, 0.2), (1.0, 1.0), seed=seed,
                                             max_keep=40, with_pred=True)
        assert dt == str(ck.dtype) == "int32"
        for a, b in ((k, ck), (m, cm), (p, cp)):
            assert np.array_equal(np.array(a), b), f"multiblock seed {seed}"
