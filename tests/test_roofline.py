"""kiln.measure.roofline: MACs counted from ONNX graphs against counts worked out by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from kiln.core.errors import KilnError
from kiln.measure import roofline
from kiln.measure.roofline import count_macs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter announces its retirement


def export(module: torch.nn.Module, shape: tuple[int, ...], path) -> str:
    """A torch module exported as kiln's TorchScript path does it: the batch dim symbolic."""
    torch.onnx.export(module.eval(), torch.zeros(2, *shape), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return str(path)


def graph(path, nodes, inputs, initializers=(), opset=17, domains=()) -> str:
    """A graph from onnx.helper; `inputs` are name -> shape, float32, the first dim symbolic."""
    values = [oh.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *s]) for n, s in inputs.items()]
    g = oh.make_graph(nodes, "g", values, [oh.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)])
    g.initializer.extend(numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in dict(initializers).items())
    opsets = [oh.make_opsetid("", opset), *(oh.make_opsetid(d, 1) for d in domains)]
    onnx.save(oh.make_model(g, opset_imports=opsets), str(path))
    return str(path)


def test_convolutions_strided_depthwise_1d(tmp_path):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise: 16x16 out, 1 input channel per output
        torch.nn.Conv2d(8, 16, 1),
        torch.nn.Conv2d(16, 12, (3, 5), stride=(1, 2), padding=(0, 2), groups=4),  # 14x8 out, 4 channels per group
    )
    count = count_macs(export(net, (8, 32, 32), tmp_path / "conv.onnx"))
    assert count.per_image == 8 * 16 * 16 * 9 + 16 * 16 * 16 * 8 + 12 * 14 * 8 * 4 * 15
    assert count.by_op == {"Conv": count.per_image} and count.nodes == 3 and count.uncounted == ()
    conv1d = count_macs(export(torch.nn.Conv1d(4, 6, 5, padding=2), (4, 20), tmp_path / "conv1d.onnx"))
    assert conv1d.per_image == 6 * 20 * 4 * 5
    conv3d = count_macs(export(torch.nn.Conv3d(2, 3, 3), (2, 6, 6, 6), tmp_path / "conv3d.onnx"))
    assert conv3d.per_image == 3 * 4 * 4 * 4 * 2 * 27


def test_conv_transpose(tmp_path):
    up = torch.nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)  # each of 8x10x10 inputs feeds 4 x 4x4 outputs
    count = count_macs(export(up, (8, 10, 10), tmp_path / "up.onnx"))
    assert count.per_image == 8 * 10 * 10 * 4 * 16 and count.by_op == {"ConvTranspose": count.per_image}
    grouped = torch.nn.ConvTranspose2d(8, 6, 3, groups=2)
    assert count_macs(export(grouped, (8, 5, 5), tmp_path / "g.onnx")).per_image == 8 * 5 * 5 * 3 * 9


def test_linear_gemm_and_matmul_per_image_independent_of_batch(tmp_path):
    path = export(torch.nn.Linear(64, 10), (64,), tmp_path / "fc.onnx")
    counts = [count_macs(path, batch=b) for b in (1, 3, 8)]
    assert {c.per_image for c in counts} == {640} and [c.batch for c in counts] == [1, 3, 8]
    assert counts[0].by_op == {"Gemm": 640}
    seq = count_macs(export(torch.nn.Linear(64, 10), (7, 64), tmp_path / "seq.onnx"), batch=5)  # 3-D input: MatMul
    assert seq.per_image == 7 * 64 * 10 and set(seq.by_op) == {"MatMul"}


def test_gemm_transposes(tmp_path):
    nodes = [oh.make_node("Gemm", ["a", "w"], ["y"], transA=1, transB=1)]
    path = graph(tmp_path / "gemm.onnx", nodes, {}, {"w": (6, 4)})  # B^T: [K=4, N=6]
    model = onnx.load(path)
    model.graph.input.append(oh.make_tensor_value_info("a", TensorProto.FLOAT, [4, "batch"]))  # A^T: [M=batch, K=4]
    onnx.save(model, path)
    assert count_macs(path, batch=3).per_image == 6 * 4


def test_attention_shaped_batched_matmul(tmp_path):
    heads, seq, dim = 4, 10, 16
    nodes = [oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), oh.make_node("MatMul", ["q", "kt"], ["s"])]
    nodes += [oh.make_node("MatMul", ["s", "v"], ["o"])]
    path = graph(tmp_path / "sdpa.onnx", nodes, {n: (heads, seq, dim) for n in "qkv"})
    count = count_macs(path, batch=2)
    assert count.per_image == 2 * heads * seq * seq * dim and count.nodes == 2
    # broadcast batch dims and 1-D operands follow numpy
    nodes = [oh.make_node("MatMul", ["x", "w"], ["y"]), oh.make_node("MatMul", ["y", "v"], ["z"])]
    path = graph(tmp_path / "bcast.onnx", nodes, {"x": (1, 5, 8)}, {"w": (3, 8, 6), "v": (6,)})
    assert count_macs(path).per_image == 3 * 5 * 8 * 6 + 3 * 5 * 6


def test_einsum_and_fused_attention_ops(tmp_path):
    heads, seq, kv, dim = 2, 6, 9, 8
    nodes = [
        oh.make_node("Einsum", ["q", "k"], ["s"], equation="bhqd,bhkd->bhqk"),
        oh.make_node("Einsum", ["s"], ["t"], equation="...ij->...ji"),
    ]
    path = graph(tmp_path / "einsum.onnx", nodes, {"q": (heads, seq, dim), "k": (heads, kv, dim)})
    assert count_macs(path).per_image == heads * seq * kv * dim
    path = graph(
        tmp_path / "chain.onnx",
        [oh.make_node("Einsum", ["a", "b", "c"], ["y"], equation="ij,jk,kl->il")],
        {"a": (3,)},
        {"b": (3, 4), "c": (4, 5)},
    )
    assert count_macs(path, batch=2).per_image == (2 * 3 * 4 + 2 * 4 * 5) // 2  # (ab)c: i is the batch dim

    attention = oh.make_node("Attention", ["q", "k", "v"], ["o"])  # ONNX opset 23, 4-D: [B, heads, S, head_dim]
    path = graph(tmp_path / "attn.onnx", [attention], {"q": (heads, seq, dim), "k": (heads, kv, dim), "v": (heads, kv, dim)}, opset=23)
    assert count_macs(path, batch=3).per_image == 2 * heads * seq * kv * dim
    attention = oh.make_node("Attention", ["q", "k", "v"], ["o"], q_num_heads=4, kv_num_heads=2)  # 3-D, grouped KV heads
    path = graph(tmp_path / "gqa.onnx", [attention], {"q": (seq, 4 * dim), "k": (kv, 2 * dim), "v": (kv, 2 * dim)}, opset=23)
    assert count_macs(path).per_image == 2 * 4 * seq * kv * dim

    mha = oh.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads)
    path = graph(
        tmp_path / "mha.onnx", [mha], {"q": (seq, heads * dim), "k": (kv, heads * dim), "v": (kv, heads * dim)}, domains=["com.microsoft"]
    )
    assert count_macs(path).by_op == {"com.microsoft.MultiHeadAttention": 2 * heads * seq * kv * dim}
    fused = oh.make_node("Attention", ["x", "w", "bias"], ["o"], domain="com.microsoft", num_heads=heads)  # QKV projection included
    path = graph(
        tmp_path / "msattn.onnx",
        [fused],
        {"x": (seq, 32)},
        {"w": (32, 3 * heads * dim), "bias": (3 * heads * dim,)},
        domains=["com.microsoft"],
    )
    assert count_macs(path).per_image == seq * 32 * 3 * heads * dim + 2 * heads * seq * seq * dim


def test_shapes_inference_cannot_see_are_read_from_an_onnx_runtime_run(tmp_path, monkeypatch):
    # The Reshape's target is computed in float: shape inference's data propagation stops there.
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        oh.make_node("ReduceProd", ["sf"], ["p"], keepdims=1),
        oh.make_node("Div", ["p", "c64"], ["n"]),
        oh.make_node("Concat", ["n", "c64"], ["shape_f"], axis=0),
        oh.make_node("Cast", ["shape_f"], ["shape"], to=TensorProto.INT64),
        oh.make_node("Reshape", ["x", "shape"], ["y"]),
        oh.make_node("MatMul", ["y", "w"], ["z"]),
    ]
    path = graph(tmp_path / "dyn.onnx", nodes, {"x": (4, 16)}, {"w": (64, 32)})
    g = onnx.load(path)
    g.graph.initializer.append(numpy_helper.from_array(np.array([64.0], np.float32), "c64"))
    onnx.save(g, path, save_as_external_data=True, location="dyn.data", size_threshold=0)  # the run needs the weights back
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=False, data_prop=True)
    y = next(v for v in inferred.graph.value_info if v.name == "y")
    assert not all(d.HasField("dim_value") for d in y.type.tensor_type.shape.dim), "shape inference resolved it: the test proves nothing"

    asked = []
    run = roofline._run_for_shapes
    monkeypatch.setattr(roofline, "_run_for_shapes", lambda *a: asked.append(a[-1]) or run(*a))
    count = count_macs(path, batch=3)
    assert asked == [["y"]] and count.per_image == 64 * 32 and count.uncounted == ()

    monkeypatch.setattr(roofline, "_run_for_shapes", lambda *a: {})  # no runtime to ask: a lower bound, and says so
    assert count_macs(path).uncounted == ("MatMul#0",) and count_macs(path).per_image == 0


def test_external_data_shape_constants_need_no_runtime(tmp_path, monkeypatch):
    nodes = [oh.make_node("Reshape", ["x", "target"], ["y"]), oh.make_node("MatMul", ["y", "w"], ["z"])]
    path = graph(tmp_path / "reshape.onnx", nodes, {"x": (4, 16)}, {"w": (64, 8)})
    model = onnx.load(path)
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "target"))
    onnx.save(model, path, save_as_external_data=True, location="reshape.data", size_threshold=0)
    monkeypatch.setattr(roofline, "_run_for_shapes", lambda *a: pytest.fail(f"ONNX Runtime asked for {a[-1]}"))
    assert count_macs(path, batch=2).per_image == 64 * 8


def test_other_symbolic_dims_need_sizes(tmp_path):
    value = oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    g = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "g", [value], [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    g.initializer.append(numpy_helper.from_array(np.zeros((8, 4), np.float32), "w"))
    path = tmp_path / "seq.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    with pytest.raises(KilnError, match="'seq'"):
        count_macs(path)
    assert count_macs(path, batch=2, dims={"seq": 5}).per_image == 5 * 8 * 4


def test_resnet18_external_data(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.onnx"
    export(torchvision.models.resnet18(weights=None), (3, 224, 224), path)
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="resnet18.data")
    count = count_macs(path, batch=2)
    assert count.per_image == pytest.approx(1.81e9, rel=0.01) and count.uncounted == ()
    assert count.by_op["Gemm"] == 512 * 1000 and count.nodes == 21  # 20 convolutions and the classifier
    assert count.to_dict()["per_image"] == count.per_image
