"""Training across nodes: two ``megaseg fit`` processes as two nodes of one DDP run.

Each process is started the way torchrun or a SLURM script starts one per node: the same
command with ``--trainer.num_nodes 2 --trainer.devices 1`` and the environment Lightning's
``LightningEnvironment`` reads (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK``); they meet over localhost TCP with gloo on the CPU. Each "node" is given its
own root folder, as nodes with their own disks: whatever rank 1 wrote would show there.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from test_train_cli import ENV, REPO, check_two_rank_streams, extra_config, fit_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_on_their_own_episodes_and_checkpoint_once(tmp_path):
    port, roots = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for rank, root in enumerate(roots):
        args = fit_args(root, 3, "--config", extra_config(tmp_path, every_n_train_steps=2),
                        "--trainer.limit_val_batches", "0", "--trainer.strategy", "ddp",
                        "--trainer.num_nodes", "2", "--trainer.devices", "1",
                        "--trainer.accelerator", "cpu")  # fmt: skip
        env = ENV | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                     "NODE_RANK": str(rank), "LOCAL_RANK": "0"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "megaseg.cli", *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]

    # each rank its own episode stream (the log dir is rank 0's: Lightning broadcasts it)
    check_two_rank_streams(roots[0])

    # the checkpoints, weights and logs written once, by rank 0; rank 1's "disk" stays empty
    assert sorted(p.name for p in (roots[0] / "checkpoints").iterdir()) == [
        "epoch=0-step=2.ckpt", "last.ckpt"
    ]  # fmt: skip
    assert (roots[0] / "export" / "final.safetensors").is_file()
    assert [p.name for p in (roots[0] / "lightning_logs").iterdir()] == ["version_0"]
    assert not roots[1].exists()
    assert "megaseg fit wrote:" in outputs[0] and "megaseg fit wrote:" not in outputs[1]
