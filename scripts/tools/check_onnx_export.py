"""
The ONNX step of the zoo's TensorRT recipe, checked on a CPU: ``python -m monai.bundle trt_export --use_onnx True
--use_trace True --network_def#use_list_output True`` first exports ``network_def`` to ONNX with MONAI's
`convert_to_onnx` (then TensorRT builds its engine from that graph, which needs a GPU). This tool makes the same
export, runs the graph with onnxruntime on the CPU and compares its six head outputs (classification and box
regression of three FPN levels) with torch's on a windowed synthetic chest phantom:

    python -m scripts.tools.check_onnx_export --shape 128 128 64
    python -m scripts.tools.check_onnx_export --config_file "['configs/inference.json','configs/demo.json']"

It needs ``onnx``, ``onnxscript`` and ``onnxruntime``, which the bundle does not: install them where you run it.
The weights are those of ``--ckpt_file`` when the file exists (default ``models/model.pt``), else random. Prints one
line per output and exits 1 when an output differs by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.utils import convert_to_onnx
from scripts.data.phantoms import generate_case
from scripts.inference.io import load_network

INPUT_NAMES = ["input_0"]  # MONAI's trt_export default
OUTPUT_NAMES = [f"output_{i}" for i in range(6)]  # the zoo's README: three levels, classification then boxes


@dataclass(frozen=True)
class OutputDiff:
    """How one network output of the ONNX graph differs from torch's.

    Args:
        name: the ONNX output name.
        shape: the output's shape.
        max_abs_diff: the largest absolute difference, onnxruntime against torch.
        max_abs: the largest absolute value of torch's output (the scale of the difference).
    """

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs: float


def phantom_input(parser: ConfigParser, shape: Sequence[int], seed: int) -> torch.Tensor:
    """One synthetic chest phantom of ``shape`` voxels, windowed by the config's ``intensity_transforms#hu_window``,
    as a (1, 1, x, y, z) float32 batch."""
    volume, _, _ = generate_case(np.random.default_rng(seed), shape=shape)
    window = parser.get_parsed_content("intensity_transforms#hu_window")
    image = window({"image": torch.as_tensor(volume, dtype=torch.float32)[None]})["image"]
    return torch.as_tensor(image)[None].float()


def export_and_compare(network: torch.nn.Module, batch: torch.Tensor, onnx_path: str) -> list[OutputDiff]:
    """Export ``network`` (list outputs) to ``onnx_path`` the way `monai.networks.utils.convert_to_trt` does with
    ``use_onnx`` and ``use_trace``, run it with onnxruntime on the CPU, and compare each output with torch's."""
    import onnxruntime  # the bundle does not need it; only this tool does

    network = network.eval()
    dynamic_axes = {name: {0: "batchsize"} for name in INPUT_NAMES + OUTPUT_NAMES}
    onnx_model = convert_to_onnx(
        network, [batch], INPUT_NAMES, OUTPUT_NAMES, use_trace=True, dynamic_axes=dynamic_axes, filename=onnx_path
    )
    with torch.no_grad():
        expected = network(batch)
    session = onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: batch.numpy()})
    if len(expected) != len(OUTPUT_NAMES):
        raise ValueError(f"network_def returned {len(expected)} outputs, the zoo's recipe names {len(OUTPUT_NAMES)}")
    return [
        OutputDiff(name, tuple(ours.shape), float(np.abs(ours.numpy() - theirs).max()), float(ours.abs().max()))
        for name, ours, theirs in zip(OUTPUT_NAMES, expected, got)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", default="configs/inference.json", help="a config or a list of configs")
    parser.add_argument("--ckpt_file", default="models/model.pt", help="weights to load, when the file exists")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64], help="phantom size (x y z voxels)")
    parser.add_argument("--seed", type=int, default=0, help="phantom and random-weight seed")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest absolute difference allowed")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    files = ast.literal_eval(args.config_file) if args.config_file.startswith("[") else args.config_file
    config = ConfigParser()
    config.read_config(files)
    config["network_def#use_list_output"] = True  # as the zoo's trt_export command sets it
    network = config.get_parsed_content("network_def")
    if os.path.isfile(args.ckpt_file):
        network = load_network(args.ckpt_file, network, "cpu")
    weights = args.ckpt_file if os.path.isfile(args.ckpt_file) else "random weights"
    batch = phantom_input(config, args.shape, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        diffs = export_and_compare(network, batch, os.path.join(folder, "network.onnx"))
    print(f"network_def of {files} ({weights}), input {list(batch.shape)}, torch {torch.__version__}")
    for d in diffs:
        print(f"{d.name} {list(d.shape)}: max |onnxruntime - torch| {d.max_abs_diff:.3g} (max |torch| {d.max_abs:.3g})")
    worst = max(d.max_abs_diff for d in diffs)
    print(f"largest difference {worst:.3g} ({'within' if worst <= args.atol else 'above'} --atol {args.atol:g})")
    if worst > args.atol:
        sys.exit(1)


if __name__ == "__main__":
    main()
