"""The GPU session's record: versions, and what the test suite and the sanitizer found, as JSON and Markdown.

    python3 -m benchmarks.session_summary versions [--out WORK/versions.json]
    python3 -m benchmarks.session_summary summarize --work WORK --out OUT [--command CMD] [--budget-s S]
    python3 -m benchmarks.session_summary digest     # this checkout's source digest, to match a record

``summarize`` reads what benchmarks/gpu_session.sh leaves in its work folder (versions.json,
steps.tsv, junit-<step>.xml or, for a run cut before pytest wrote its XML, pytest-<step>.log,
sanitizer/sanitizer.json) and writes OUT/check.json and OUT/check.md, ready to be committed under
benchmarks/results/<gpu>-<date>/; it prints the Markdown. Whatever is missing is reported as
missing: a step cut by its time limit still leaves a summary of what it did.
"""

import argparse
import collections
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOLS = ("memcheck", "initcheck", "racecheck", "synccheck")
DISTRIBUTIONS = ("torch", "triton", "transformers", "pytest", "pytest-xdist", "pytest-timeout", "hypothesis")
SOURCES = ("ampfuse", "kernels", "csrc", "tests", "benchmarks", "setup.py", "pyproject.toml")


# ----------------------------------------------------------------------------- versions

def run(command, timeout=30):
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        return (done.stdout + done.stderr).strip() if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def source_digest(root=ROOT):
    """sha256 over the source files (path and contents), so a record made without .git (the device
    tool copies the working tree only) can be matched to a commit later."""
    digest = hashlib.sha256()
    files = []
    for name in SOURCES:
        path = root / name
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    for path in files:
        if "__pycache__" in path.parts or path.suffix in (".so", ".pyc") or "results" in path.parts:
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def versions():
    release = platform.release()
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "kernel": release, "cpus": os.cpu_count(), "python": platform.python_version(),
            # the device tool's two runtimes: compute-sanitizer and ncu work on Firecracker only
            "runtime": "gVisor" if release.startswith("4.4.0") else "Firecracker" if "-fc-" in release else "unknown"}
    for dist in DISTRIBUTIONS:
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                        gpu_memory_gib=round(p.total_memory / 2**30, 1))
    except Exception as exc:  # noqa: BLE001 - a broken torch is itself worth recording
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
               "--format=csv,noheader"])
    info["nvidia_smi"] = smi.splitlines()[0] if smi else "nvidia-smi not found or failed"
    if smi:
        info.setdefault("gpu", smi.split(",")[0].strip())
        info["driver"] = smi.split(",")[1].strip()
    from benchmarks.sanitize import find_sanitizer

    sanitizer = find_sanitizer()
    version = run([sanitizer, "--version"]) if sanitizer else None
    info["compute_sanitizer"] = version.splitlines()[-1] if version else "not found"
    nvcc = run([os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), "--version"]) or run(
        ["nvcc", "--version"])
    info["nvcc"] = re.search(r"release [\d.]+", nvcc).group(0) if nvcc and "release" in nvcc else "not found"
    info["commit"] = os.environ.get("COMMIT") or (run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) if
                                                  shutil.which("git") else None)
    info["source_digest"] = source_digest()
    return info


# ----------------------------------------------------------------------------- the test suite

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
LOG_LINE = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)"
                      r"|^(\S+::\S*) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
LOG_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "xfailed",
               "XPASS": "xpassed"}


def nodeid(case):
    """pytest's node id of a junit testcase (xunit1 gives the file; classname the module and class)."""
    parts = case.get("classname", "").split(".")
    klass = parts.pop() if parts and parts[-1][:1].isupper() else None
    path = case.get("file") or "/".join(parts) + ".py"
    return f"{path}::{klass + '::' if klass else ''}{case.get('name')}"


def parse_junit(path):
    """[(nodeid, outcome, seconds, message)] of one junit XML file."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):  # a test interrupted by the step's time limit: the log has it
            continue
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                message = child.get("message") or ((child.text or "").strip().splitlines() or [""])[-1]
                outcome = {"failure": "failed", "error": "error"}.get(tag) or (
                    "xfailed" if child.get("type") == "pytest.xfail" else "skipped")
                break
        results.append((nodeid(case), outcome, float(case.get("time") or 0), message))
    return results


def parse_log(path):
    """From pytest -v output: [(nodeid, outcome, None, message)] of the tests that finished, the
    tests that started and never finished (running when the run was cut), and the number of tests
    collected. The messages come from the short summary (-rfE), where the run got that far."""
    text = path.read_text(errors="replace")
    results, messages, started = {}, {}, []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            word, test = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
            results[test] = LOG_OUTCOME[word]
        elif re.match(r"^\S+::\S+ *$", line):  # xdist -v: a worker started this test
            started.append(line.strip())
        summary = re.match(r"^(FAILED|ERROR) (\S+) - (.*)$", line)
        if summary:
            messages[summary.group(2)] = summary.group(3)
    collected = re.findall(r"\[(\d+) items?\]|collected (\d+) items?", text)
    total = int(next((a or b for a, b in collected[-1:]), 0)) or None
    unfinished = [t for t in dict.fromkeys(started) if t not in results]
    return [(t, o, None, messages.get(t)) for t, o in results.items()], unfinished, total


def one_line(message, limit=400):
    return " / ".join(line.strip() for line in (message or "").splitlines() if line.strip())[:limit]


def summarize_tests(work, steps):
    """One pytest step's results from its junit XML, completed from its -v log: a run cut by its
    time limit writes no XML or an XML without the tests it interrupted, and a worker that crashed
    (a per-test timeout ends the worker) is in the log."""
    runs, everything, unfinished = [], [], []
    for step in [s for s in steps if s["name"].startswith("tests") and s["rc"] != "skip"]:
        junit, log = work / f"junit-{step['name']}.xml", work / f"pytest-{step['name']}.log"
        results, sources, started, collected = [], [], [], None
        if junit.exists() and junit.stat().st_size:
            try:
                results, sources = parse_junit(junit), ["junit"]
            except ET.ParseError:
                sources = ["junit unreadable"]
        if log.exists():
            from_log, started, collected = parse_log(log)
            named = {r[0] for r in results}
            extra = [r for r in from_log if r[0] not in named]
            results += extra
            sources += ["log"] if extra or not results else []
        finished = {r[0] for r in results}
        started = [t for t in started if t not in finished]
        cut = step["rc"] in (124, 137) or step["rc"] == 2
        runs.append({"step": step["name"], "rc": step["rc"], "seconds": step["seconds"], "selection": step["note"],
                     "source": " + ".join(sources) or "none", "collected": collected, "ran": len(results),
                     "complete": not cut and not started and bool(results),
                     "counts": dict(collections.Counter(r[1] for r in results))})
        everything += results
        unfinished += started
    counts = {o: sum(1 for _, out, _, _ in everything if out == o) for o in OUTCOMES}
    skips = collections.Counter(m or "?" for _, o, _, m in everything if o == "skipped")
    timed = sorted((r for r in everything if (r[2] or 0) >= 0.05), key=lambda r: -r[2])
    return {
        "runs": runs, "counts": counts, "complete": bool(runs) and all(r["complete"] for r in runs),
        "unfinished": unfinished,
        "failed": [{"test": t, "message": one_line(m)} for t, o, _, m in everything if o == "failed"],
        "errors": [{"test": t, "message": one_line(m)} for t, o, _, m in everything if o == "error"],
        "skip_reasons": dict(skips.most_common()),
        "slowest": [{"test": t, "seconds": round(s, 1)} for t, _, s, _ in timed[:12]],
    }


# ----------------------------------------------------------------------------- the sanitizer

def summarize_sanitizer(work):
    path = work / "sanitizer" / "sanitizer.json"
    if not path.exists():
        return {"status": "not run", "probe": None, "cases": {}}
    state = json.loads(path.read_text())
    cases = collections.defaultdict(dict)
    for job in state["jobs"].values():
        if job.get("case"):
            cases[job["case"]][job["tool"]] = job
    tool_jobs = [job for case in cases.values() for tool, job in case.items() if tool in TOOLS]
    probe = state.get("probe") or {}
    statuses = {j["status"] for j in tool_jobs}  # a skipped case (the extension not built) was not checked
    if probe.get("status") != "ok":
        status = "unavailable"
    elif "errors" in statuses:
        status = "errors"
    elif not statuses or statuses - {"clean", "warnings"}:
        status = "incomplete"  # a timeout, a job the deadline left out, a skipped case, a case that failed
    else:
        status = "clean with warnings" if "warnings" in statuses else "clean"
    return {"status": status, "probe": probe, "sanitizer": state.get("sanitizer"),
            "cases": {name: cases[name] for name in sorted(cases)}}


def plain_cell(job):
    if job is None:
        return "-"
    status = job["status"]
    if status == "ok":
        errors = [e for e in (job.get("rel_errors") or {}).values() if e is not None]
        return f"ok, max err {max(errors):.1e}" if errors else "ok (not checked)"
    detail = (job.get("case_detail") or job.get("detail") or "").replace("|", "/").replace("\n", " ")
    if status == "skipped":
        return f"skipped: {detail.split('is unavailable: ')[-1][:70]}"
    return f"**{status}**: {detail[:90]}"


def tool_cell(job):
    if job is None:
        return "-"
    status = job["status"]
    if status == "errors":
        where = sorted({f"{r.get('kernel') or '?'} ({r.get('phase') or '?'})" for r in job.get("reports", [])
                        if not r.get("api")})
        api = f", {job['api_errors']} API errors" if job.get("api_errors") else ""
        return f"**{job.get('errors')} errors**{api}: {', '.join(where)[:120]}"
    if status == "timeout":
        return f"**timeout** ({job.get('timeout_s')} s)"
    if status == "warnings":
        return f"clean, {job.get('warnings')} warnings"
    if status in ("incomplete", "crashed") or status.startswith("clean until"):
        return f"**{status}**"
    return status


# ----------------------------------------------------------------------------- the record

def read_steps(work):
    steps = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, limit, *note = line.split("\t")
        steps.append({"name": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                      "seconds": int(seconds) if seconds.isdigit() else None,
                      "limit_s": int(limit) if limit.isdigit() else None, "note": "\t".join(note)})
    return steps


def step_result(step):
    rc = step["rc"]
    if rc == "skip":
        return f"skipped: {step['note']}"
    if rc in (124, 137):
        return f"**cut at its {step['limit_s']} s limit**"
    if rc == 0:
        return "ok"
    if step["name"].startswith("tests") and rc == 1:
        return "ran; tests failed"
    return f"**failed (exit status {rc})**"


def verdict(record):
    build = next((s for s in record["steps"] if s["name"] == "build"), None)
    tests = record["tests"]
    failing = tests["counts"]["failed"] + tests["counts"]["error"]
    return {
        "build": "not run" if build is None else step_result(build).strip("*"),
        "tests": "fail" if failing else "pass" if tests["complete"] and tests["counts"]["passed"] else "incomplete",
        "sanitizer": record["sanitizer"]["status"],
    }


def results_dir(v):
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", v.get("gpu") or "no-GPU").strip("-")
    return f"benchmarks/results/{gpu}-{(v.get('date_utc') or '')[:10]}"


def markdown(record):
    v, t, s = record["versions"], record["tests"], record["sanitizer"]
    lines = [f"# GPU check: {v.get('gpu', 'no GPU')}, {v.get('date_utc', '?')} UTC", ""]
    lines += [f"Command: `{record['command']}`", "",
              f"Commit {v.get('commit') or 'unknown'} (source digest {v.get('source_digest')}); "
              f"{record['seconds']} s of a {record['budget_s']} s budget. Verdict: build {record['verdict']['build']}, "
              f"tests **{record['verdict']['tests']}**, sanitizer **{record['verdict']['sanitizer']}**.", "",
              f"torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton {v.get('triton')}, transformers "
              f"{v.get('transformers')}, pytest {v.get('pytest')} (xdist {v.get('pytest-xdist')}, timeout "
              f"{v.get('pytest-timeout')}); driver {v.get('driver', '-')}, capability {v.get('capability', '-')}, "
              f"{v.get('sms', '-')} SMs; nvcc {v.get('nvcc')}; compute-sanitizer: {v.get('compute_sanitizer')}; "
              f"{v.get('runtime')} runtime (kernel {v.get('kernel')}), {v.get('cpus')} CPUs.", "",
              "| step | result | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {st['name']} | {step_result(st)} | {st['seconds'] if st['seconds'] is not None else '-'} | "
              f"{st['limit_s'] or '-'} |" for st in record["steps"]]
    c = t["counts"]
    lines += ["", f"## Tests: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
              + (f", {c['xfailed']} xfailed" if c["xfailed"] else "") + ("" if t["complete"] else " (INCOMPLETE)"), ""]
    for r in t["runs"]:
        lines.append(f"- `{r['step']}` ({r['selection']}): ran {r['ran']} of {r['collected'] or '?'} collected in "
                     f"{r['seconds']} s, exit status {r['rc']}, read from {r['source']}")
    crashed = "Errors (in setup or teardown; 'worker crashed': the per-test timeout ended it)"
    for title, key in (("Failed", "failed"), (crashed, "errors")):
        if t[key]:
            lines += ["", f"### {title}", ""] + [f"- `{f['test']}`: {f['message'][:200]}" for f in t[key]]
    if t["unfinished"]:
        lines += ["", "### Running when the step was cut (hung or slow)", ""] + [f"- `{x}`" for x in t["unfinished"]]
    if t["skip_reasons"]:
        lines += ["", "### Skipped, by reason", ""] + [f"- {n} x {r[:150]}" for r, n in t["skip_reasons"].items()]
    if t["slowest"]:
        lines += ["", "### Slowest", ""] + [f"- {x['seconds']} s `{x['test']}`" for x in t["slowest"]]
    probe = s.get("probe") or {}
    detail = f" ({probe['detail'][:300]})" if probe.get("detail") else ""
    gvisor = " - the signature of gVisor, where compute-sanitizer cannot run" if probe.get("gvisor_signature") else ""
    lines += ["", f"## Sanitizer: {s['status']}", "", f"Probe: {probe.get('status', 'not run')}{detail}{gvisor}", ""]
    if s["cases"]:
        lines += ["| case | plain run | " + " | ".join(TOOLS) + " |", "|---" * (len(TOOLS) + 2) + "|"]
        for name, jobs in s["cases"].items():
            lines.append(f"| {name} | {plain_cell(jobs.get('plain'))} | "
                         + " | ".join(tool_cell(jobs.get(tool)) for tool in TOOLS) + " |")
        reports = [(name, tool, r) for name, jobs in s["cases"].items() for tool, job in jobs.items()
                   for r in job.get("reports") or []]
        if reports:
            lines += ["", "### First reports", ""]
            for name, tool, r in reports[:20]:
                lines.append(f"- {name} {tool}, phase {r.get('phase')}, kernel {r.get('kernel')}: {r['report']} / "
                             + " / ".join(r.get("lines", [])[:2]))
    lines += ["", f"Logs: check-logs.tar.gz. Commit this file and check.json under `{record['results_dir']}/`.", ""]
    return "\n".join(lines)


def summarize(work, out, command, budget_s, elapsed_s=None):
    versions_path = work / "versions.json"
    try:
        v = json.loads(versions_path.read_text())
    except (OSError, ValueError):
        v = {"error": f"{versions_path} missing or unreadable"}
    steps = read_steps(work)
    # the build runs beside the other steps: the stage's time is the wall clock, not the steps' sum
    record = {"command": command, "budget_s": budget_s, "seconds": elapsed_s,
              "versions": v, "steps": steps, "tests": summarize_tests(work, steps),
              "sanitizer": summarize_sanitizer(work)}
    record["verdict"] = verdict(record)
    record["results_dir"] = results_dir(v)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(record, indent=1))
    text = markdown(record)
    (out / "check.md").write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions").add_argument("--out", type=pathlib.Path, help="write here rather than print")
    sub.add_parser("digest")
    s = sub.add_parser("summarize")
    s.add_argument("--work", required=True, type=pathlib.Path)
    s.add_argument("--out", required=True, type=pathlib.Path)
    s.add_argument("--command", default="bash benchmarks/gpu_session.sh", dest="run_command")
    s.add_argument("--budget-s", type=int, default=None)
    s.add_argument("--elapsed-s", type=int, default=None, help="the stage's wall-clock time so far")
    args = parser.parse_args(argv)
    if args.command == "versions":
        text = json.dumps(versions(), indent=1)
        args.out.write_text(text) if args.out else print(text)
    elif args.command == "digest":
        print(source_digest())
    else:
        print(summarize(args.work, args.out, args.run_command, args.budget_s, args.elapsed_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
