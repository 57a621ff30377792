"""dev compare-peers on a tiny random bf16 checkpoint: every row runs (or says why not), same-format rows agree."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import dev_modules  # noqa: F401  (dev/ on sys.path)
from conftest import make_hf_checkpoint
from qwen2q_dev.research import compare_peers

pytest.importorskip("transformers")

SMALL = ["--dataset", "pydoc", "--seq-len", "64", "--max-windows", "2"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    make_hf_checkpoint(path, dtype=torch.bfloat16, tie_word_embeddings=True, seed=3)
    return path


def _run(src, tmp_path, *extra):
    out = tmp_path / "peers.json"
    rc = compare_peers.main([str(src), *SMALL, "--json", str(out), "--work-dir", str(tmp_path / "work"), *extra])
    return rc, json.loads(out.read_text())


def test_all_rows_side_by_side(src, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    rc, result = _run(src, tmp_path)
    assert rc == 0
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["reference", *compare_peers.ROWS]
    for name in ("reference", "transformers-bf16", "qwen2q-nf4", "bnb-nf4", "qwen2q-int8", "bnb-int8", "qwen2q-int4-g128"):
        assert rows[name]["status"] == "ok", rows[name]
    from conftest import shared_data

    for name in ("qwen2q-awq-g128", "qwen2q-awq-gptq-g128"):  # calibrate on ../shared/data/calib
        awq = rows[name]["status"]
        assert awq == "ok" if shared_data() else awq != "ok", (name, awq)
    assert rows["autoawq-g128"]["status"].startswith("not available: opt-in")
    llmc = rows["llmcompressor-awq-g128"]["status"]
    assert llmc == "ok" or llmc.startswith("not available"), llmc
    for r in rows.values():  # every row that quantizes says its wall and CPU seconds
        if r["status"] == "ok" and r["row"] not in ("reference", "transformers-bf16"):
            assert r["quantize_seconds"] > 0 and r["quantize_cpu_seconds"] > 0, r
    assert rows["transformers-bf16"]["quantize_cpu_seconds"] is None

    ref = rows["reference"]["ppl"]
    for r in rows.values():
        if r["status"] == "ok" and r["row"] != "reference":
            assert math.isclose(r["ppl_reference"], ref, rel_tol=1e-9)  # one reference, replayed
    assert rows["transformers-bf16"]["kl"] < 1e-4  # the two bf16 implementations agree
    # Same format, bit-identical weights: same storage and the same drift.
    assert rows["qwen2q-nf4"]["bits_per_weight"] == rows["bnb-nf4"]["bits_per_weight"]
    assert rows["qwen2q-int8"]["bits_per_weight"] == rows["bnb-int8"]["bits_per_weight"]
    assert rows["qwen2q-int4-g128"]["bits_per_weight"] == pytest.approx(4 + 4 / 128 + 16 / 128)
    assert abs(rows["qwen2q-nf4"]["kl"] - rows["bnb-nf4"]["kl"]) <= 1e-3
    assert rows["qwen2q-nf4"]["kl"] == pytest.approx(rows["bnb-nf4"]["kl"], rel=0.1)

    s = result["settings"]
    assert (s["seq_len"], s["windows"], s["scored_tokens"]) == (64, 2, 126)
    assert {"torch", "transformers", "bitsandbytes", "autoawq"} <= set(s["versions"])
    table = capsys.readouterr().out
    assert "transformers+bnb nf4" in table and "not available" in table
    from bitsandbytes.functional import has_avx512bf16  # bitsandbytes' fast path, switched off where the CPU has it

    assert ("AVX512-BF16" in table) == bool(has_avx512bf16())
    assert "cpu s" in table


def test_missing_peer_is_reported_not_fatal(src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    rc, result = _run(src, tmp_path, "--only", "bnb-nf4,qwen2q-int8")
    assert rc == 0
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["bnb-nf4"]["status"].startswith("not available") and "bitsandbytes" in rows["bnb-nf4"]["status"]
    assert rows["qwen2q-int8"]["status"] == "ok"


def test_missing_llmcompressor_is_reported_not_fatal(src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)
    rc, result = _run(src, tmp_path, "--only", "llmcompressor-awq-g128")
    assert rc == 0
    status = result["rows"][-1]["status"]
    assert status.startswith("not available") and "llm-compressor" in status, status


def test_gptq_rounding_missing_is_unavailable(monkeypatch, tmp_path):
    """A qwen2q whose CalibrationSettings has no `rounding` field: the GPTQ row says so, before any work."""
    import dataclasses

    from qwen2q.calibrate import pipeline

    @dataclasses.dataclass
    class OldSettings:
        ids: torch.Tensor | None = None

    monkeypatch.setattr(pipeline, "CalibrationSettings", OldSettings)
    ctx = compare_peers.Context(tmp_path, tmp_path, torch.bfloat16, None)  # calibration_ids() would fail: not reached
    with pytest.raises(compare_peers.Unavailable, match="rounding"):
        compare_peers.qwen2q_awq("gptq")(ctx)


def test_awq_rows_pass_rounding_explicitly(monkeypatch, tmp_path):
    """qwen2q's default rounding changed (nearest, then gptq): each AWQ row asks for its own."""
    seen = []

    def fake_convert(src, dst, qcfg, calib, progress=True):
        seen.append(calib.rounding)
        raise RuntimeError("stop")

    monkeypatch.setattr(compare_peers, "quantize", fake_convert)
    ctx = compare_peers.Context(tmp_path, tmp_path, torch.bfloat16, None, _calib=torch.zeros(1, 4, dtype=torch.long))
    for rounding in ("nearest", "gptq"):
        with pytest.raises(RuntimeError, match="stop"):
            compare_peers.qwen2q_awq(rounding)(ctx)
    assert seen == ["nearest", "gptq"]


def test_clock_counts_cpu_seconds():
    with compare_peers.Clock() as clock:
        t = torch.randn(256, 256)
        for _ in range(200):
            t = torch.tanh(t @ t.T / 256)
    assert clock.wall > 0 and clock.cpu > 0


class _AliasingBackup:
    """AutoAWQ's scale-search pattern, in miniature: back up with `.cpu()`, scale in place, quantize, restore."""

    def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, *args, **kwargs):
        backup = {k: v.cpu() for k, v in module2inspect.state_dict().items()}
        with torch.no_grad():
            for fc in linears2scale:
                fc.weight.mul_(2.0)
                fc.weight.data = torch.round(fc.weight.data) / 2.0
            module2inspect.load_state_dict(backup)
        return torch.ones(1)


def test_copying_backup_keeps_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    w = lin.weight.detach().clone()
    _AliasingBackup()._compute_best_scale(None, None, None, lin, [lin])
    assert torch.equal(lin.weight, 2 * w)  # the stock pattern corrupts a CPU-resident module
    lin.weight.data = w.clone()
    compare_peers.copying_backup(_AliasingBackup)()._compute_best_scale(None, None, None, lin, [lin])
    assert torch.equal(lin.weight, w)
    assert "state_dict" not in vars(lin)  # the module's own method is back


def test_copying_backup_on_autoawq_search():
    """The real AutoAWQ 0.2.9 grid search on one CPU linear: stock leaves the weights scaled, the fix does not."""
    pytest.importorskip("awq")
    from awq.quantize.quantizer import AwqQuantizer

    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.linspace(0.1, 4, 256)
    results = {}
    for name, cls in (("stock", AwqQuantizer), ("fixed", compare_peers.copying_backup(AwqQuantizer))):
        lin = torch.nn.Linear(256, 64, bias=False)
        torch.nn.init.normal_(lin.weight, std=0.05)
        w = lin.weight.detach().clone()
        q = object.__new__(cls)  # no calibration: only the attributes the search reads
        q.w_bit, q.group_size, q.zero_point, q.duo_scaling, q.max_chunk_memory = 4, 128, True, True, 2**30
        q.n_parallel_calib_samples = None
        w_mean = (w.abs().view(-1, 128) / w.abs().view(-1, 128).amax(1, keepdim=True)).view_as(w).mean(0)
        with torch.no_grad():
            q._compute_best_scale(x, w_mean, x.abs().mean(0), lin, [lin], lin(x))
        results[name] = (lin.weight - w).abs().max().item()
    assert results["fixed"] == 0.0
    assert results["stock"] > 0.0


def test_no_pin_memory_patch():
    class Cache:
        def pin_memory(self, batch_index, input_names=None):
            raise RuntimeError("cannot pin on a CPU-only torch")

    original = Cache.pin_memory
    with compare_peers._no_pin_memory(Cache):
        if not torch.cuda.is_available():
            assert Cache().pin_memory(0) is None
    assert Cache.pin_memory is original


def test_calibration_loader_keeps_blocks_in_order():
    calib = torch.arange(12).view(3, 4)
    batches = list(compare_peers._calibration_loader(calib))
    assert [b["input_ids"].tolist() for b in batches] == [[r] for r in calib.tolist()]
    assert all(b["attention_mask"].sum() == 4 for b in batches)


class _ByteTokenizer:
    def encode(self, text):
        return list(text.encode("utf-8"))


def test_calibration_cuts_are_consecutive_disjoint_runs(tmp_path):
    """Cut k holds tokens k*n .. (k+1)*n - 1 of the text with <doc> lines removed (n = samples * seq_len)."""
    text = "".join(f"line {i} of the calibration text\n" for i in range(200))
    path = tmp_path / "calib.txt"
    path.write_text('<doc id="1" title="t">\n' + text + "</doc>\n", encoding="utf-8")
    expected = list(text.encode("utf-8"))
    cuts = [compare_peers.calibration_blocks(path, _ByteTokenizer(), 3, 16, cut=k) for k in range(4)]
    assert all(c.shape == (3, 16) and c.dtype == torch.long for c in cuts)
    assert torch.cat([c.flatten() for c in cuts]).tolist() == expected[:4 * 48]
    assert torch.equal(cuts[0], compare_peers.calibration_blocks(path, _ByteTokenizer(), 3, 16))
    with pytest.raises(compare_peers.Qwen2qError, match="calib-cut"):
        compare_peers.calibration_blocks(path, _ByteTokenizer(), 3, 16, cut=len(expected) // 48)


def test_bake_and_packed_tensors():
    """Fake-quantized weights replace the float ones; the storage counts the compressor's tensors instead."""
    from types import SimpleNamespace

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model[0].quantization_scheme = SimpleNamespace(weights="w4")
    model[0].register_parameter("weight_scale", torch.nn.Parameter(torch.ones(8, 1)))

    def forward_quantize(module, value, base_name, args):
        assert (base_name, args) == ("weight", "w4")
        return torch.round(value * 4) / 4

    assert compare_peers._bake_fake_quant(model, forward_quantize) == 1
    assert torch.equal(model[0].weight, torch.round(model[0].weight * 4) / 4) and not model[0].quantization_enabled

    class Compressor:
        @staticmethod
        def compress(state, scheme):
            assert set(state) == {"weight", "bias", "weight_scale"}
            return {"weight_packed": torch.zeros(8, 1, dtype=torch.int32), "weight_scale": state["weight_scale"],
                    "bias": state["bias"]}

    names = [n for n, _ in compare_peers._packed_tensors(model, Compressor)()]
    assert sorted(names) == ["0.bias", "0.weight_packed", "0.weight_scale", "1.bias", "1.weight", "2.bias", "2.weight"]


def test_unknown_row_is_refused(src):
    with pytest.raises(SystemExit):
        compare_peers.main([str(src), "--only", "qwen2q-nf5"])


@pytest.mark.slow
def test_autoawq_row(src, tmp_path):
    """AutoAWQ quantizes (fp32, calibrated) and qwen2q runs its checkpoint: same layout as qwen2q int4."""
    pytest.importorskip("awq")
    from pydoc_data.topics import topics

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    rc, result = _run(src, tmp_path, "--only", "qwen2q-int4-g128,autoawq-g128", "--with-autoawq",
                      "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "64")
    assert rc == 0
    rows = {r["row"]: r for r in result["rows"]}
    awq, rtn = rows["autoawq-g128"], rows["qwen2q-int4-g128"]
    assert awq["status"] == "ok", awq
    assert awq["bits_per_weight"] == rtn["bits_per_weight"]
    assert awq["kl"] < 2 * rtn["kl"]  # calibrated scales should not do much worse than round to nearest


def test_reference_cache_is_reused_by_a_later_run(src, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "ref-cache"
    rc, first = _run(src, tmp_path, "--only", "qwen2q-int4-g128", "--reference-cache", str(cache))
    assert rc == 0
    (key,) = [p.name for p in cache.iterdir()]
    assert key == compare_peers.reference_key(src, torch.bfloat16)
    assert len(list((cache / key).glob("*.pt"))) == 2 and not list((cache / key).glob("*.tmp"))

    real_load = compare_peers.load_model

    def guarded_load(path, **kw):
        model = real_load(path, **kw)
        if Path(path) == Path(src):
            def refuse(*a, **k):
                raise AssertionError("the reference model ran again instead of replaying its cached logits")
            model.forward = refuse
        return model
    monkeypatch.setattr(compare_peers, "load_model", guarded_load)
    capsys.readouterr()
    rc, second = _run(src, tmp_path / "again", "--only", "qwen2q-int4-g128", "--reference-cache", str(cache))
    assert rc == 0 and "2 windows' logits reused" in capsys.readouterr().err
    a, b = first["rows"], second["rows"]
    assert a[0]["ppl"] == b[0]["ppl"] and a[1]["window_nll_reference"] == b[1]["window_nll_reference"]
    assert a[1]["kl"] == b[1]["kl"]
