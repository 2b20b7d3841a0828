"""The model as its engines take it: model.inputs, with data.preprocess folded in and demo weights noted.

It joins the model's block with the data's (preprocessing, demo weights), so it lives with the data, above
the typed views of params it reads (kiln.config.views).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from kiln.config.views import InputSpec, ModelSpec
from kiln.core.errors import KilnError
from kiln.data.demo_weights import DemoWeights
from kiln.data.images import Preprocess


def engine_spec(params: Mapping[str, Any]) -> ModelSpec:
    """The model as its engines take it (not the traffic they serve: `serve`). With export.fold_preprocess,
    data.preprocess's scaling, normalisation and layout move into the graph, and the single image input
    becomes uint8 [crop, crop, channels]."""
    spec = ModelSpec.from_params(params.get("model") or {})
    preprocess = Preprocess.from_params((params.get("data") or {}).get("preprocess"))
    demo = DemoWeights.from_params((params.get("model") or {}).get("demo_weights"))
    # Only ever for random weights: trained BatchNorm statistics and heads are the model.
    if demo.enabled and not spec.trained_weights()[0]:
        spec = replace(spec, demo={**demo.to_params(), "preprocess": preprocess.to_params()})
    if not (params.get("export") or {}).get("fold_preprocess"):
        return spec
    if len(spec.inputs) != 1 or preprocess.dtype != "float32" or tuple(spec.inputs[0].shape) != preprocess.sample_shape():
        raise KilnError(
            f"export.fold_preprocess needs one float32 image input shaped like data.preprocess makes it "
            f"({list(preprocess.sample_shape())}); model.inputs is {[(i.name, list(i.shape), i.dtype) for i in spec.inputs]}"
        )
    folded = InputSpec(spec.inputs[0].name, preprocess.folded().sample_shape(), "uint8", (0, 255))
    return replace(spec, inputs=(folded,), fold=preprocess.to_params())
