"""tools/train_net.py across two machines, as users run it: two hosts with addresses of their
own (network namespaces joined by a veth pair, made by the test), two CPU processes each
(gloo), --num-machines 2 --machine-rank R --dist-url tcp://HOST0:PORT. One host is killed in
the middle of the run, both resume from the last checkpoint, and the final weights equal
those of an uninterrupted run of 4 processes on one machine, bit for bit. Where network
namespaces cannot be made (not root, no iproute2, no permission), the test skips and says
why. Nothing leaves the namespaces."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from tests.tooling import QUICK, ROOT  # noqa: E402

pytestmark = pytest.mark.slow

SUBNET = "10.231.0"
PORT = 29531
TINY = [
    "SOLVER.MAX_ITER",
    "6",
    "SOLVER.CHECKPOINT_PERIOD",
    "3",
    "SOLVER.IMS_PER_BATCH",
    "4",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "MODEL.DI_MASKDINO.LOSS.TRAIN_NUM_POINTS",
    "256",
    "DATASETS.TEST",
    "()",
]


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def hosts():
    """Two network namespaces, host0 (SUBNET.1) and host1 (SUBNET.2), joined by a veth pair."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed: the two hosts cannot be made")
    tag = uuid.uuid4().hex[:6]
    names = [f"dimd{tag}h0", f"dimd{tag}h1"]
    links = [f"dv{tag}0", f"dv{tag}1"]
    made = []
    try:
        for name in names:
            result = ip("netns", "add", name, check=False)
            if result.returncode != 0:
                pytest.skip(f"network namespaces cannot be made here ({result.stderr.strip()}); run as root")
            made.append(name)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for index, (name, link) in enumerate(zip(names, links)):
            ip("link", "set", link, "netns", name)
            ip("-n", name, "addr", "add", f"{SUBNET}.{index + 1}/24", "dev", link)
            ip("-n", name, "link", "set", link, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield list(zip(names, links))
    finally:
        for name in made:
            ip("netns", "del", name, check=False)


def start(command, log, env, namespace=None):
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    stream = open(log, "w")
    return subprocess.Popen(
        prefix + command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
    )


def train_command(output, *extra):
    return [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", QUICK, *extra, *TINY] + [
        "OUTPUT_DIR",
        str(output),
    ]


def run_two_hosts(hosts, output, logs, env, resume=False, kill_after_checkpoint=False):
    processes = []
    for rank, (namespace, link) in enumerate(hosts):
        command = train_command(
            output,
            "--num-gpus",
            "2",
            "--num-machines",
            "2",
            "--machine-rank",
            str(rank),
            "--dist-url",
            f"tcp://{SUBNET}.1:{PORT}",
            *(["--resume"] if resume else []),
        )
        host_env = dict(env, GLOO_SOCKET_IFNAME=link)
        name = f"host{rank}.{'resumed' if resume else 'first'}.log"
        processes.append(start(command, logs / name, host_env, namespace))
    if kill_after_checkpoint:
        tag = output / "last_checkpoint"
        while all(p.poll() is None for p in processes) and not tag.exists():
            time.sleep(0.05)
        assert tag.exists(), "the run ended before a checkpoint was written"
        os.killpg(processes[1].pid, signal.SIGKILL)  # host 1 goes down
        deadline = time.monotonic() + 120
        while processes[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if processes[0].poll() is None:  # host 0 still waiting for its peers: stopped too
            os.killpg(processes[0].pid, signal.SIGKILL)
        for process in processes:
            process.wait()
        return
    for process in processes:
        process.wait(timeout=1800)
    for rank, process in enumerate(processes):
        log = (logs / f"host{rank}.{'resumed' if resume else 'first'}.log").read_text()
        assert process.returncode == 0, f"host {rank}:\n{log[-4000:]}"


def final_weights(output):
    return torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def test_two_hosts_killed_and_resumed_equal_one_uninterrupted_run(hosts, data_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root), OMP_NUM_THREADS="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    reference = tmp_path / "reference"
    process = start(train_command(reference, "--num-gpus", "4"), logs / "reference.log", env)
    assert process.wait(timeout=1800) == 0, (logs / "reference.log").read_text()[-4000:]

    interrupted = tmp_path / "two_hosts"
    run_two_hosts(hosts, interrupted, logs, env, kill_after_checkpoint=True)
    assert (interrupted / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (interrupted / "model_final.pth").exists()
    run_two_hosts(hosts, interrupted, logs, env, resume=True)
    log = (logs / "host0.resumed.log").read_text()
    assert "Starting training from iteration 3" in log
    shutil.copytree(logs, os.environ.get("DI_MASKDINO_TEST_LOGS", tmp_path / "kept"), dirs_exist_ok=True)

    expected, found = final_weights(reference), final_weights(interrupted)
    assert expected.keys() == found.keys()
    different = [k for k in expected if not torch.equal(expected[k], found[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def test_a_dist_url_that_no_host_answers_is_named(data_root, tmp_path):
    result = subprocess.run(
        train_command(
            tmp_path,
            *["--num-gpus", "1", "--num-machines", "2", "--machine-rank", "1"],
            *["--dist-url", "tcp://127.0.0.1:9", "--dist-timeout", "2"],
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, DETECTRON2_DATASETS=str(data_root)),
        timeout=300,
    )
    assert result.returncode != 0
    assert "--dist-url tcp://127.0.0.1:9: no machine answered within 2 s" in result.stderr
    assert "Start machine 0 (--machine-rank 0)" in result.stderr
