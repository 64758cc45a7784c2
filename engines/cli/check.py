"""Check a quantized export's DiT against FP32 with Polygraphy on the DiT inputs the export saved (check/):
ONNX Runtime always, TensorRT engines with --engines where TensorRT and a GPU are present. Prints one row
per comparison and timestep bucket, writes EXPORT/check_report.json, and exits 0 when every comparison
reaches the recipe's thresholds (mean SQNR and cosine over all inputs and per bucket), 1 when one does not,
2 on bad input. A UNet-family export (AudioLDM, TANGO): each FP32 graph against the PyTorch module it came from,
on sampler and random inputs the export's parity did not use (engines/evaluation/unet_check.py)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from engines.cli.common import run
from engines.runtime.logs import setup_logging

log = logging.getLogger("check")


def _value(v: object, digits: int) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(report: dict) -> str:
    head = ["reference vs candidate", "bucket", "inputs", "SQNR dB", "cosine", "max abs err", "result"]
    rows = []
    for c in report["comparisons"]:
        pair = f"{c['reference']} vs {c['candidate']}"
        if c["status"] == "skipped":
            rows.append([pair, "-", "-", "-", "-", "-", f"skipped: {c['reason']}"])
            continue
        for b in c["buckets"]:
            rows.append([pair, f"b{b['bucket']} (t {b['t_max']:.3f}..{max(b['t_min'], 0.0):.3f})", str(b["inputs"]),
                         _value(b["sqnr_db"], 2), _value(b["cosine"], 5), _value(b["max_abs_err"], 4),
                         "pass" if b["passed"] else "FAIL"])
        rows.append([pair, "all", str(c["inputs"]), _value(c["sqnr_db"], 2), _value(c["cosine"], 5),
                     _value(c["max_abs_err"], 4), c["status"].upper() if c["status"] == "failed" else "pass"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = report["thresholds"]
    return "\n".join(lines) + f"\nthresholds (recipe): SQNR >= {t['min_sqnr_db']} dB and cosine >= {t['min_cosine']}, " \
                              "mean over all inputs and over each bucket's inputs"


def unet_table(report: dict) -> str:
    head = ["graph", "reference vs candidate", "inputs", "max rel err", "max abs err", "SQNR dB", "cosine", "result"]
    rows = []
    for c in report["comparisons"]:
        pair = f"{c['reference']} vs {c['candidate']}"
        if c["status"] == "skipped":
            rows.append([c["graph"], pair, "-", "-", "-", "-", "-", f"skipped: {c['reason']}"])
            continue
        rows.append([c["graph"], pair, str(c["inputs"]), f"{c['max_rel_error']:.2e}", f"{c['max_abs_error']:.2e}",
                     _value(c["sqnr_db"], 1), _value(c["cosine"], 7), "pass" if c["status"] == "passed" else "FAIL"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\nrule: {report['rule']} ({report['tolerance']:.0e})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="quantized export directory, or any UNet-family export (written by "
                        "scripts/export.py)")
    parser.add_argument("--engines", default=None, help="engines directory (scripts/build_engines.py) to check too")
    parser.add_argument("--reference", default=None,
                        help="FP32 dit.onnx to run as the reference (default: the outputs saved in check/)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: ONNX Runtime's CUDA provider "
                        "(TensorRT provider too where TensorRT is installed; needs onnxruntime-gpu)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show Polygraphy's comparison log")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from engines.evaluation.check import REPORT, run_checks
    from exporter.onnx.artifacts import MANIFEST, read_manifest

    if (Path(args.export) / MANIFEST).is_file() and read_manifest(Path(args.export)).get("family") == "unet":
        return _check_unet(args)
    report = run_checks(Path(args.export), Path(args.engines) if args.engines else None,
                        Path(args.reference) if args.reference else None, device=args.device)
    print(table(report))
    for c in report["comparisons"]:
        for failure in c.get("failures", []):
            log.error("%s vs %s: %s", c["reference"], c["candidate"], failure)
    log.info("report written to %s", Path(args.export) / REPORT)
    print(json.dumps({"passed": report["passed"], "report": str(Path(args.export).resolve() / REPORT),
                      **{f"{c['candidate']}.sqnr_db": c["sqnr_db"] for c in report["comparisons"] if "sqnr_db" in c}}))
    return 0 if report["passed"] else 1


def _check_unet(args: argparse.Namespace) -> int:
    """A UNet-family export: its graphs against the PyTorch modules (see engines/evaluation/unet_check.py)."""
    from engines.evaluation.unet_check import REPORT, run_unet_checks
    from exporter.errors import InputError

    for flag, value in (("--engines", args.engines), ("--reference", args.reference)):
        if value is not None:
            raise InputError(f"{flag} is not available for a UNet-family export yet (issue 21): check compares its "
                             "ONNX graphs with the PyTorch model the manifest names")
    report = run_unet_checks(Path(args.export), device=args.device)
    print(unet_table(report))
    for c in report["comparisons"]:
        for failure in c.get("failures", []):
            log.error("%s: %s", c["graph"], failure)
    log.info("report written to %s", Path(args.export) / REPORT)
    print(json.dumps({"passed": report["passed"], "report": str(Path(args.export).resolve() / REPORT),
                      **{f"{c['graph']}.max_rel_error": c["max_rel_error"] for c in report["comparisons"]
                         if "max_rel_error" in c}}))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    run(main)
