"""The GPU check in one command (``make gpu``): the ``gpu`` test tier and every speed and memory
benchmark on CUDA, written to one JSON file and one markdown table.

Each part runs in its own process (a crash or an out-of-memory in one does not stop the others,
and each peak-memory figure starts from an empty device) under a time limit. Times are compared
as ratios against the plain computation measured in the same process; absolute times and memory
are labelled with the card's name.

    python benchmarks/gpu_report.py                 # CUDA: the tier, then the benchmarks (about 6 min on an H100)
    python benchmarks/gpu_report.py --smoke         # CPU: the same parts at tiny sizes (what CI runs)
    python benchmarks/gpu_report.py --only coop_step tpt_latency --skip-tests

Writes ``<out>/gpu_report.json`` and ``<out>/gpu_report.md`` (``--out``, default
``outputs/gpu-report``) and exits non-zero when a part failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.gpu_report")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Part:
    """One benchmark script with its full (CUDA) and smoke (CPU) arguments."""

    name: str
    script: str
    full: tuple[str, ...]
    smoke: tuple[str, ...]
    timeout: int = 120


SMALL = ("--model", "ViT-S-32")  # the smallest plain ViT open_clip names: the smoke's model
PARTS = (
    Part("coop_step", "coop_step.py",
         ("--classes", "100", "1000", "--plain-max-classes", "1000", "--precision", "bf16", "--repeats", "5"),
         (*SMALL, "--classes", "4", "16", "--batch-size", "2", "--n-ctx", "4", "--repeats", "1")),
    Part("tpt_latency", "tpt_latency.py",
         ("--classes", "200", "1000", "--precision", "bf16", "--repeats", "3", "--gen-images", "8", "--gen-views", "32"),
         (*SMALL, "--classes", "4", "--views", "4", "--repeats", "1", "--gen-images", "1", "--gen-views", "2")),
    Part("segmentation_step", "segmentation_step.py", ("--batch-size", "32", "--repeats", "5"),
         (*SMALL, "--size", "64", "--batch-size", "2", "--repeats", "1")),
    Part("segmentation_step_clipseg", "segmentation_step.py", ("--vlsm", "clipseg", "--batch-size", "32", "--repeats", "5"),
         ("--vlsm", "clipseg", "--size", "64", "--batch-size", "1", "--repeats", "1")),
    Part("gram_meta_step", "gram_meta_step.py", ("--episodes", "8", "--repeats", "3"),
         (*SMALL, "--size", "64", "--episodes", "1", "--ways", "2", "--shots", "1", "--queries", "1", "--inner-steps", "1",
          "--repeats", "1")),
    Part("feature_bank_fill", "feature_bank_fill.py", ("--model", "ViT-B-16", "--images", "512", "--workers", "8"),
         (*SMALL, "--images", "8", "--workers", "2", "--repeats", "1")),
    Part("loader_throughput", "loader_throughput.py",
         ("--images", "512", "--workers", "0", "4", "8", "--precision", "bf16"),
         (*SMALL, "--images", "16", "--batch-size", "4", "--workers", "0", "2", "--epochs", "1", "--repeats", "1")),
    Part("grad_checkpointing", "grad_checkpointing.py", ("--models", "ViT-L-14", "ViT-H-14", "--batch", "8"),
         ("--models", "ViT-S-32", "--batch", "1"), timeout=200),
)


def environment(device: str) -> dict[str, Any]:
    import lightning
    import open_clip

    info = {"device": device, "torch": torch.__version__, "lightning": lightning.__version__,
            "open_clip": open_clip.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def _env(smoke: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("PYTEST_XDIST_WORKER", None)
    if smoke:
        env["VLPROMPT_GPU_SMOKE"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke is the CPU path, even on a machine with a GPU
    return env


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_tests(out: Path, smoke: bool, timeout: int) -> dict[str, Any]:
    """The ``gpu`` tier through pytest; per test: outcome, seconds and the figures it recorded."""
    junit = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_gpu.py"), "-m", "gpu", "-q",
               "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1", "--timeout", str(timeout // 2)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(smoke), cwd=ROOT)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        returncode, output = None, f"timed out after {timeout} s\n{err.stdout or ''}"
    tests = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                element = case.find(kind)
                if element is not None:
                    outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind], \
                        _tail(element.get("message") or element.text or "", 8)
            figures = {p.get("name"): float(p.get("value")) for p in case.iter("property")}
            tests.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                          "figures": figures, "message": message})
    ok = returncode == 0 and bool(tests) and all(t["outcome"] in ("passed", "skipped") for t in tests)
    return {"ok": ok, "returncode": returncode, "seconds": time.perf_counter() - start, "tests": tests,
            "output_tail": "" if ok else _tail(output, 60)}


def run_part(part: Part, out: Path, smoke: bool, device: str) -> dict[str, Any]:
    target = out / f"{part.name}.json"
    target.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / part.script), *(part.smoke if smoke else part.full), "--device", device,
               "--json", str(target)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=part.timeout, env=_env(smoke), cwd=HERE)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        returncode, output = None, f"timed out after {part.timeout} s\n{err.stdout or ''}"
    result: dict[str, Any] = {"ok": returncode == 0 and target.is_file(), "seconds": time.perf_counter() - start,
                              "command": " ".join(command[1:])}
    if target.is_file():
        result.update(json.loads(target.read_text()))
        target.unlink()
    if not result["ok"]:
        result["output_tail"] = _tail(output)
    return result


# -- the markdown --------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _by(rows: list[dict], key: str, variant: str = "variant") -> dict[Any, dict[str, dict]]:
    grouped: dict[Any, dict[str, dict]] = {}
    for row in rows:
        if key in row:
            grouped.setdefault(row[key], {})[row[variant]] = row
    return grouped


def headline(name: str, rows: list[dict[str, Any]]) -> list[str]:
    """The ratios each benchmark is for, one line each."""
    lines = []
    if name == "coop_step":
        for classes, v in _by(rows, "classes").items():
            if "plain" in v and "now" in v:
                lines.append(f"CoOp step, {classes} classes: vlprompt {v['plain']['seconds'] / v['now']['seconds']:.1f}x "
                             f"faster than plain, peak memory {_fmt(v['now']['peak_mib'])} vs {_fmt(v['plain']['peak_mib'])} MiB")
    elif name == "tpt_latency":
        for classes, v in _by(rows, "classes").items():
            if "plain" in v and "vlprompt" in v:
                lines.append(f"TPT, {classes} classes: {v['vlprompt']['seconds']:.3f} s/image "
                             f"({v['plain']['seconds'] / v['vlprompt']['seconds']:.1f}x faster than plain), peak "
                             f"{_fmt(v['vlprompt']['peak_mib'])} MiB per image vs plain {_fmt(v['plain']['peak_mib'])} MiB")
    elif name.startswith("segmentation_step"):
        for strategy, v in _by(rows, "strategy").items():
            lines.append(f"{strategy}: vlprompt {v['plain']['seconds'] / v['vlprompt']['seconds']:.2f}x faster than plain")
    elif name == "grad_checkpointing":
        for model, v in _by(rows, "model", "checkpointing").items():
            if v[False]["peak_mib"]:
                lines.append(f"MaPLe on {model}: peak {_fmt(v[False]['peak_mib'])} MiB -> {_fmt(v[True]['peak_mib'])} MiB "
                             f"with checkpointing ({v[True]['peak_mib'] / v[False]['peak_mib']:.2f}x), "
                             f"time {v[True]['seconds'] / v[False]['seconds']:.2f}x")
    elif name == "loader_throughput":
        loaders = [r for r in rows if r["stage"] == "loader"]
        if loaders:
            best = max(loaders, key=lambda r: r["images_per_second"])
            verdict = "the loader keeps up" if best["ratio_to_training"] >= 1 else "decoding is the bottleneck"
            lines.append(f"best loader ({best['workers']} workers) {best['images_per_second']:.0f} images/s = "
                         f"{best['ratio_to_training']:.2f}x a VPT-deep training step, {best['ratio_to_inference']:.2f}x "
                         f"the frozen tower's inference: for prompted image towers {verdict}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    mode = "CPU smoke (tiny sizes)" if report["smoke"] else "CUDA"
    lines = [f"# vlprompt GPU report: {env['card']}", "",
             f"{mode}; torch {env['torch']}, Lightning {env['lightning']}, open_clip {env['open_clip']}; "
             f"{report['seconds']:.0f} s in all. Times are ratios against the plain computation in the same process; "
             f"absolute times and memory are this card's.", ""]
    tests = report.get("tests")
    if tests:
        passed = sum(t["outcome"] == "passed" for t in tests["tests"])
        lines += [f"## `gpu` test tier: {passed} of {len(tests['tests'])} passed ({tests['seconds']:.0f} s)", "",
                  "| test | outcome | s | figures |", "|---|---|---|---|"]
        for t in tests["tests"]:
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in t["figures"].items())
            lines.append(f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} | {figures} |")
        if tests["output_tail"]:
            lines += ["", "```", tests["output_tail"], "```"]
        lines.append("")
    for name, part in report["benchmarks"].items():
        lines += [f"## {name} ({part['seconds']:.0f} s)", ""]
        if not part["ok"]:
            lines += ["FAILED:", "", "```", part.get("output_tail", ""), "```", ""]
            continue
        settings = ", ".join(f"{k} {v}" for k, v in part.get("settings", {}).items())
        lines += [f"{part['device']}; {settings}", ""]
        lines += [f"- {line}" for line in headline(name, part["rows"])]
        lines += ["", *_table(part["rows"]), ""]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path, start: float) -> None:
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_report.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="on the CPU, at tiny sizes (CI)")
    parser.add_argument("--out", default="outputs/gpu-report")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], help="these benchmarks only")
    parser.add_argument("--skip-tests", action="store_true", help="the benchmarks only")
    parser.add_argument("--skip-benchmarks", action="store_true", help="the test tier only")
    parser.add_argument("--tests-timeout", type=int, default=300, help="seconds for the whole tier (half for one test)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --smoke for the CPU check")
    device = "cpu" if args.smoke else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"smoke": args.smoke, "environment": environment(device), "benchmarks": {}}
    log.info("vlprompt GPU report on %s", report["environment"]["card"])
    if not args.skip_tests:
        report["tests"] = run_tests(out, args.smoke, args.tests_timeout)
        counts = {o: sum(t["outcome"] == o for t in report["tests"]["tests"]) for o in ("passed", "failed", "error", "skipped")}
        log.info("gpu tier: %s in %.0f s", ", ".join(f"{n} {o}" for o, n in counts.items() if n), report["tests"]["seconds"])
        write(report, out, start)
    if not args.skip_benchmarks:
        for part in PARTS:
            if args.only and part.name not in args.only:
                continue
            result = run_part(part, out, args.smoke, device)
            report["benchmarks"][part.name] = result
            write(report, out, start)  # what is done stays written if a later part hangs
            log.info("%-26s %s in %.0f s", part.name, "ok" if result["ok"] else "FAILED", result["seconds"])
            for line in headline(part.name, result.get("rows", [])):
                log.info("    %s", line)
    write(report, out, start)
    failed = [name for name, part in report["benchmarks"].items() if not part["ok"]]
    if "tests" in report and not report["tests"]["ok"]:
        failed.insert(0, "gpu tests")
    log.info("wrote %s and %s (%.0f s)", out / "gpu_report.json", out / "gpu_report.md", report["seconds"])
    if failed:
        log.error("failed: %s", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
