"""kernels/runtime.py: direct launches (tests/launch_checks.py, in a process of its own) and the device
switch of the ops' launchers."""

import os
import subprocess
import sys

import torch

from ampfuse.kernels import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_direct_launches_match_tritons_own():
    # compiles real sm_90 kernels: a process of its own, where Triton's interpreter has run nothing
    # (pyproject's addopts replaced: they ask for xdist workers, which the GPU machine may lack)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=--import-mode=importlib", "-p",
                           "no:cacheprovider", "tests/launch_checks.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "6 passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


def test_cuda_tensors_off_the_current_device_switch_it(monkeypatch):
    # the decision of runtime.device_switch, with current_device faked (no two-GPU machine to run it on)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    switch = runtime.device_switch(torch.device("cuda", 0))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 0
    assert runtime.device_switch(torch.device("cuda", 1)) is None
    assert runtime.device_switch(torch.device("cpu")) is None
