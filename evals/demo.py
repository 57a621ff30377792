"""`qwen2q demo`: every quantization method on the embedded model, each measured against bf16."""
from __future__ import annotations

import tempfile
from pathlib import Path

import qwen2q
from qwen2q.evals.data import EvalText
from qwen2q.evals.harness import evaluate
from qwen2q.qconfig import QuantConfig

METHODS = (QuantConfig("nf4"), QuantConfig("int8"), QuantConfig("int4", group_size=128))
AWQ = QuantConfig("awq", group_size=128)
AWQ_CALIBRATION = dict(samples=16, seq_len=512, search_tokens=2048)  # small: the demo stays near a minute


def run(text: EvalText, max_windows: int | None = 16, source: Path | None = None, progress: bool = True,
        calibration: str | None = None) -> dict:
    """Quantize `source` (default: the embedded model) with each method into a temporary directory and
    evaluate all against it; rows carry bits/weight and quantize time too.  AWQ joins when calibration
    text is available (`calibration`: a file, folder or hub id; default ../shared/data/calib or
    $QWEN2Q_DATA); it never calibrates on the evaluation text."""
    from qwen2q.api import DEFAULT_MODEL
    from qwen2q.calibrate.data import default_source
    from qwen2q.calibrate.pipeline import CalibrationSettings

    source = Path(source or DEFAULT_MODEL)
    notes = []
    with tempfile.TemporaryDirectory(prefix="qwen2q-demo-") as tmp:
        reports, paths = {}, []
        for qcfg in METHODS:
            dst = Path(tmp) / qcfg.method
            reports[str(dst)] = qwen2q.quantize(source, dst, qcfg, progress=False)
            paths.append(dst)
        calib = calibration or default_source()
        if calib is not None:
            dst = Path(tmp) / "awq"
            report = qwen2q.quantize(source, dst, AWQ, CalibrationSettings(str(calib), **AWQ_CALIBRATION), progress=False)
            reports[str(dst)] = report
            paths.append(dst)
            notes.append(f"awq calibration: {report.calibration}")
        else:
            notes.append("awq skipped: no calibration text (give --calib-data FILE, or set QWEN2Q_DATA to a folder "
                         "with calib/wiki.utf8)")
        result = evaluate(paths, text, reference=source, max_windows=max_windows, progress=progress)
    for row in result["rows"]:
        report = reports.get(row["model"])
        if report is not None:
            row["bits_per_weight"] = report.bits_per_weight
            row["quantize_seconds"] = report.seconds
            row["peak_rss_bytes"] = report.peak_rss_bytes
        row["model"] = Path(row["model"]).name if report is not None else "embedded bf16"
        row["name"] = row["model"]
    result["notes"] = notes
    return result
