"""Distributed training of the weak-supervision U-Net: two CPU processes with gloo on the loopback interface."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from MedCLIPSAMLib.weak import train as train_module
from MedCLIPSAMLib.weak.train import WeakTrainConfig, load_checkpoint

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        return server.getsockname()[1]


def _write_pairs(folder: Path, count: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rows, columns = np.mgrid[:36, :36]
    for index in range(count):
        center_y, center_x = rng.integers(10, 26, 2)
        disc = (rows - center_y) ** 2 + (columns - center_x) ** 2 < rng.uniform(5, 9) ** 2
        image = rng.normal(50, 10, (36, 36)) + 150 * disc
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(images / f"case{index}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(masks / f"case{index}_mask.png")
    return images, masks


def _train_rank(rank: int, port: int, images: str, masks: str, output: str, states: str) -> None:
    """Body of one spawned rank: the environment torchrun would set, then an ordinary train_weak call."""
    torch.set_num_threads(1)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "GLOO_SOCKET_IFNAME": "lo",
        }
    )
    config = WeakTrainConfig(
        epochs=2, image_size=32, batch_size=2, base_channels=4, depth=2, val_fraction=0.25, seed=0, device="cpu"
    )
    # Record the process group size that training saw, to prove that the ranks trained together.
    group_sizes = []
    validate = train_module._validate

    def spy(*args, **kwargs):
        group_sizes.append(torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        return validate(*args, **kwargs)

    train_module._validate = spy
    result = train_module.train_weak(images, masks, output, config)
    state = {key: value.cpu() for key, value in result.model.state_dict().items()}
    torch.save({"state": state, "group_sizes": group_sizes}, Path(states) / f"{rank}.pt")
    if rank == 0:
        # Rank 0 hosts the TCPStore here (torchrun hosts it in its agent instead), so rank 0 stays alive until
        # rank 1 has finished its teardown.
        # NOTE: rank 1 aborted once in a full-suite run ("terminate called without an active exception") after
        # training. A store that vanished under it is a guess at the cause, not a confirmed one.
        deadline = time.monotonic() + 120
        while not (Path(states) / "1.pt").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.slow
def test_two_rank_gloo_training_identical_weights(tmp_path):
    images, masks = _write_pairs(tmp_path / "data", count=8)
    states = tmp_path / "states"
    states.mkdir()
    output = tmp_path / "run"
    mp.spawn(
        _train_rank,
        args=(_free_port(), str(images), str(masks), str(output), str(states)),
        nprocs=WORLD_SIZE,
        join=True,
    )

    saved0 = torch.load(states / "0.pt", weights_only=True)
    saved1 = torch.load(states / "1.pt", weights_only=True)
    assert saved0["group_sizes"] == [WORLD_SIZE, WORLD_SIZE]
    assert saved1["group_sizes"] == [WORLD_SIZE, WORLD_SIZE]
    rank0, rank1 = saved0["state"], saved1["state"]
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    checkpoint = load_checkpoint(output / "last.pt")
    assert checkpoint["epoch"] == 2
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(value, rank0[key]), key
    assert (output / "best.pt").is_file()
    assert not any(path.name.endswith(".tmp") for path in output.iterdir())
