"""Runs the cases of benchmarks/sanitize_cases.py under compute-sanitizer, in parallel, to a deadline.

    python3 -m benchmarks.sanitize --out DIR [--cases NAME,...|all] [--tools memcheck,initcheck,...]
                                   [--jobs N] [--deadline-s S]

Jobs, in this order: a probe (does compute-sanitizer work on this machine at all? On gVisor it
refuses the device), then each case once without a sanitizer (``plain``: the numbers, and Triton's
compile cache filled before the slow runs), then every tool over every case, tool by tool
(memcheck first), so a run cut by its deadline has the most important checks. A case's sanitizer
runs wait for its plain run. Each job has a timeout; no job starts that could not finish before
the deadline, and jobs left over are recorded as not run. Jobs that already have a result in DIR
are not run again, so a second call (after the CUDA extension is built) picks up what is left.
On gVisor, where compute-sanitizer refuses the device, the probe says so and only the plain runs run.

DIR/<case>.<tool>.log holds each job's output (sanitizer reports and the case's PHASE lines,
interleaved, so each report is attributed to the phase that made it); DIR/sanitizer.json the
results, rewritten after every job.
"""

import argparse
import fnmatch
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CASES_SCRIPT = ROOT / "benchmarks" / "sanitize_cases.py"
TOOLS = ("memcheck", "initcheck", "racecheck", "synccheck")
# --padding: a read or write a little past the end of a tensor lands in a guard region rather
# than in the next allocation, where memcheck would not see it. Host backtraces of a Python
# process are long and say nothing about the kernel, so only device frames are shown.
COMMON_FLAGS = ["--show-backtrace", "device", "--print-limit", "100"]
TOOL_FLAGS = {"memcheck": ["--padding", "512"]}
# PyTorch's caching allocator hands out pieces of large blocks; memcheck and initcheck see only
# whole cudaMalloc allocations, so every tensor gets its own.
SANITIZER_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
PROBE = "import torch; x = torch.ones(1000, device='cuda'); print('probe', (x * 2).sum().item())"


def find_sanitizer():
    for candidate in (os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer"),
                      "/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# ----------------------------------------------------------------------------- reading a log

KERNEL_AT_OFFSET = re.compile(r"([A-Za-z_][\w:]*)(?:\([^()]*\))?\+0x[0-9a-fA-F]+")  # name+0x1a0 / name(int*)+0x1a0
KERNEL_AFTER_LINE = re.compile(r" in \S+?:\d+:([A-Za-z_]\w*)")                      # in file.cu:12:name(...)
KERNEL_AFTER_PC = re.compile(r"\bat 0x[0-9a-fA-F]+ in (?:void )?([A-Za-z_][\w:]*)")   # at 0x70 in name<...>(...)
SUMMARY_LINES = ("ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "COMPUTE-SANITIZER", "Target application")


def kernel_name(lines):
    for line in lines:
        for pattern in (KERNEL_AFTER_LINE, KERNEL_AT_OFFSET, KERNEL_AFTER_PC):
            match = pattern.search(line)
            if match and not match.group(1).startswith("0x"):
                return match.group(1).split("::")[-1]
    return None


def parse_log(text):
    """What a compute-sanitizer log says: the summary counts, and each report with its kernel and
    the case phase (PHASE line) it came after. errors is None when no summary line was printed
    (the sanitizer was killed or crashed)."""
    errors = warnings = None
    reports, phase, current = [], None, None
    for line in text.splitlines():
        if line.startswith("PHASE "):
            phase = line.split()[-1]
            current = None
            continue
        match = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", line)
        if match:
            errors, warnings = int(match.group(2)), int(match.group(3))
            continue
        match = re.search(r"ERROR SUMMARY: (\d+) errors?", line)
        if match:
            errors = max(errors or 0, int(match.group(1)))
            continue
        if not line.startswith("========="):
            continue
        body = line[len("========="):]
        if body.startswith(" ") and not body.startswith("  ") and body.strip() and not any(
                s in body for s in SUMMARY_LINES):
            current = {"report": body.strip(), "phase": phase, "lines": [], "kernel": None}
            current["api"] = body.strip().startswith("Program hit")
            reports.append(current)
        elif current is not None and body.strip() and len(current["lines"]) < 6:
            current["lines"].append(body.strip())
    for report in reports:
        report["kernel"] = kernel_name([report["report"], *report["lines"]])
    return {"errors": errors, "warnings": warnings, "reports": reports}


def last_case_result(path):
    try:
        lines = pathlib.Path(path).read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- jobs

class Job:
    """One run: the probe, a case without a sanitizer (tool "plain"), or a case under a tool."""

    def __init__(self, out, case, tool):
        self.case, self.tool = case, tool
        self.name = f"{case}.{tool}" if case else tool
        self.log, self.result_file = out / f"{self.name}.log", out / f"{self.name}.case.json"
        self.proc = self.started = self.timeout = None

    def command(self, sanitizer, options, tiny):
        """options: tool -> its compute-sanitizer flags."""
        if self.tool == "probe":
            return [sanitizer, "--tool", "memcheck", *options["memcheck"], sys.executable, "-c", PROBE]
        run = [sys.executable, str(CASES_SCRIPT), self.case, "--result", str(self.result_file)] + ["--tiny"] * tiny
        if self.tool == "plain":
            return run
        return [sanitizer, "--tool", self.tool, *options[self.tool], *run]


class Runner:
    def __init__(self, out, cases, tools, jobs, deadline, job_timeout, sanitizer, tiny=False):
        self.out, self.jobs, self.deadline, self.job_timeout, self.tiny = out, jobs, deadline, job_timeout, tiny
        self.sanitizer = sanitizer
        self.path = out / "sanitizer.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"jobs": {}}
        self.state.setdefault("sanitizer", sanitizer)
        # The probe checks these flags too; a sanitizer that does not know one is probed again without
        # any (the options a first call settled on are reused by the second).
        self.options = self.state.get("probe", {}).get("options") or {
            tool: COMMON_FLAGS + TOOL_FLAGS.get(tool, []) for tool in TOOLS}
        self.queue = [Job(out, None, "probe")] if tools and sanitizer and "probe" not in self.state else []
        self.queue += [Job(out, case, "plain") for case in cases]
        self.queue += [Job(out, case, tool) for tool in tools for case in cases]
        self.queue = [job for job in self.queue if not self.done(job.name)]
        if tools and not sanitizer:
            self.state["probe"] = {"status": "unavailable", "detail": "compute-sanitizer not found (PATH, "
                                   "/usr/local/cuda/bin, $COMPUTE_SANITIZER): sanitizer runs skipped"}

    def done(self, name):
        """Whether an earlier call settled this job (a timeout counts: running it again costs as much)."""
        return self.state["jobs"].get(name, {}).get("status") not in (None, "not run")

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.path)

    def record(self, job, **fields):
        self.state["jobs"][job.name] = {"case": job.case, "tool": job.tool, "log": job.log.name, **fields}
        self.save()

    def blocked(self, job):
        """None when the job may start now, 'wait' while what it needs runs, else why it cannot run."""
        if job.tool in ("plain", "probe"):
            return None
        probe = self.state.get("probe", {}).get("status")
        if probe != "ok":
            return "wait" if probe is None else "sanitizer unavailable"
        plain = self.state["jobs"].get(f"{job.case}.plain")
        if plain is None or plain["status"] == "not run":
            return "wait"
        if plain.get("case_status") == "skipped":
            return f"case skipped: {plain.get('case_detail')}"
        return None

    def start(self, job, now):
        job.timeout = min(self.job_timeout, self.deadline - now)
        job.started = now
        env = {**os.environ, **({} if job.tool == "plain" else SANITIZER_ENV), "PYTHONUNBUFFERED": "1"}
        job.result_file.unlink(missing_ok=True)
        command = job.command(self.sanitizer, self.options, self.tiny)
        with open(job.log, "w") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            # a session of its own: a timeout kills the sanitizer and the Python under it together
            job.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                        start_new_session=True)

    def finish(self, job, timed_out):
        seconds = round(time.monotonic() - job.started, 1)
        text = job.log.read_text(errors="replace")
        if job.tool == "probe":
            parsed = parse_log(text)
            if job.proc.returncode == 0 and parsed["errors"] == 0:
                self.state["probe"] = {"status": "ok", "seconds": seconds, "options": self.options}
            elif any(self.options.values()) and re.search(r"(?i)unrecognized|unknown option|invalid option", text):
                self.options = {tool: [] for tool in TOOLS}  # an older sanitizer: its defaults, probed again
                self.queue.insert(0, job)
                return
            else:
                tail = "\n".join(text.strip().splitlines()[-15:])
                why = "timed out" if timed_out else f"exit status {job.proc.returncode}"
                self.state["probe"] = {"status": "unavailable", "seconds": seconds, "detail": f"probe {why}: {tail}",
                                       "gvisor_signature": "Device not supported" in text}
            self.save()
            return
        case = last_case_result(job.result_file) or {}
        parsed = parse_log(text) if job.tool != "plain" else {"errors": None, "warnings": None, "reports": []}
        kernel_reports = [r for r in parsed["reports"] if not r["api"]]
        if timed_out:
            status = "timeout"
        elif job.tool == "plain":
            status = case.get("status", "crashed")
        elif case.get("status") == "skipped":
            status = "skipped"
        elif parsed["errors"] is None:
            status = "incomplete"
        elif parsed["errors"]:
            status = "errors"
        elif case.get("status") not in ("ok", "wrong"):  # the sanitizer saw the kernels up to the failure only
            status = f"clean until the case {case.get('status', 'died')}"
        else:
            status = "warnings" if parsed["warnings"] else "clean"
        tail = None if status in ("ok", "clean", "skipped") else text.strip().splitlines()[-12:]
        self.record(job, status=status, rc=job.proc.returncode, seconds=seconds, timeout_s=round(job.timeout),
                    tail=tail, case_status=case.get("status", "no result"), case_detail=case.get("detail"),
                    rel_errors=case.get("rel_errors"), errors=parsed["errors"], warnings=parsed["warnings"],
                    kernels=sorted({r["kernel"] or "?" for r in kernel_reports}),
                    api_errors=sum(r["api"] for r in parsed["reports"]), reports=parsed["reports"][:8])

    def run(self):
        running = []
        try:
            self.loop(running)
        finally:  # interrupted (the session's own time limit): leave no sanitizer running on the GPU
            for job in running:
                if job.proc.poll() is None:
                    os.killpg(job.proc.pid, signal.SIGKILL)
            self.save()
        return self.state

    def loop(self, running):
        while self.queue or running:
            now = time.monotonic()
            for job in list(running):
                timed_out = job.proc.poll() is None and now - job.started > job.timeout
                if timed_out:
                    os.killpg(job.proc.pid, signal.SIGKILL)  # the sanitizer and the Python under it
                    job.proc.wait()
                if job.proc.poll() is not None:
                    running.remove(job)
                    self.finish(job, timed_out)
            for job in list(self.queue):
                if len(running) >= self.jobs:
                    break
                why = self.blocked(job)
                if why == "wait":
                    continue
                self.queue.remove(job)
                if why is not None:
                    self.record(job, status="skipped", detail=why)
                elif self.deadline - now < min(30.0, self.job_timeout):
                    self.record(job, status="not run", detail="out of time (deadline reached)")
                else:
                    self.start(job, now)
                    running.append(job)
            if self.queue and not running and all(self.blocked(job) == "wait" for job in self.queue):
                for job in self.queue:  # nothing left that could unblock them
                    self.record(job, status="not run", detail="waited on a job that did not run")
                self.queue = []
            time.sleep(0.2)


def case_names(patterns, exclude=""):
    """(chosen, left out): the case names matching comma-separated names or shell patterns ('all',
    '*-triton-*'), split by whether they match ``exclude``. Plain names are taken as given (a wrong
    one fails its jobs, named); patterns are matched against the script's --list, which costs a
    Python start with torch."""
    wanted = ["*" if p == "all" else p for p in patterns.split(",") if p]
    if any(set(p) & set("*?[") for p in wanted):
        listed = subprocess.run([sys.executable, str(CASES_SCRIPT), "--list"], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, check=False)
        if listed.returncode != 0:
            raise SystemExit(f"{CASES_SCRIPT.name} --list failed:\n{listed.stdout}{listed.stderr}")
        names = listed.stdout.split()
    else:
        names = wanted
    matching = [n for n in names if any(fnmatch.fnmatch(n, p) for p in wanted)]
    left_out = [n for n in matching if any(fnmatch.fnmatch(n, p) for p in exclude.split(",") if p)]
    return [n for n in matching if n not in left_out], left_out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--cases", default="all", help="comma-separated case names or patterns ('*-cuda-*'), or 'all'")
    parser.add_argument("--exclude", default="", help="comma-separated case names or patterns to leave out")
    parser.add_argument("--tiny", action="store_true", help="the cases' --tiny shapes (a CPU smoke test)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of " + ", ".join(TOOLS) +
                        "; empty: only the plain runs")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 4))
    parser.add_argument("--deadline-s", type=float, default=600.0, help="start no job that would end after this")
    parser.add_argument("--job-timeout-s", type=float, default=150.0)
    args = parser.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    if set(tools) - set(TOOLS):
        parser.error(f"unknown tools {sorted(set(tools) - set(TOOLS))}; choose from {TOOLS}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` sends TERM or INT: clean up on both
    deadline = time.monotonic() + args.deadline_s
    cases, left_out = case_names(args.cases, args.exclude)
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out, cases, tools, args.jobs, deadline, args.job_timeout_s, find_sanitizer(), args.tiny)
    for case in left_out:  # on the record as not run, so that a later call that never comes shows
        for tool in ("plain", *tools):
            if not runner.done(f"{case}.{tool}"):
                runner.record(Job(args.out, case, tool), status="not run", detail="left for a later call")
    state = runner.run()
    probe = state.get("probe", {})
    print(f"sanitizer: {probe.get('status', 'not probed')} {probe.get('detail', '')[:300]}")
    for name, job in sorted(state["jobs"].items()):
        kernels = f" in {', '.join(job['kernels'])}" if job.get("kernels") else ""
        print(f"  {name:<34} {job['status']}{kernels}  ({job.get('seconds', '-')} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
