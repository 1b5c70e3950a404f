"""How much the model's loss cares about each Linear's outputs: the error measure of the budget.

A setting changes a Linear's weight by ``dW``, so its outputs by ``dW x_t``. To second order, with
the Fisher approximation of the loss's curvature and its diagonal over output channels, the loss
rises by about::

    dL ~ 1/2 sum_i  g_i * (dW_i H dW_i^T),   g_i = mean_t (dL/dy_ti)^2,   H = sum_t x_t x_t^T

(``y = W x``; ``i`` an output channel, ``dW_i`` a row). ``H`` is what calibration already gathers
for every Linear; ``g`` takes one backward pass over the calibration text, the model's own
samples, with the loss of predicting their next tokens (whose gradient covariance is the Fisher
of the model's own distribution). Unlike a relative error per tensor, this puts every tensor of
every layer on one scale, the model's loss, so one budget can trade bytes between them: a 20%
output error in a tensor whose outputs the loss barely feels costs less than 1% in one it feels
strongly (SmolLM2's first layers' attention, for one).

`output_sensitivities` needs the whole model in memory with gradients (activations of a
micro-batch per layer); a model that is streamed from its checkpoint gets none, and the chooser
falls back to relative errors.
"""

from __future__ import annotations

import torch
from torch import nn


def output_sensitivities(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                         batch_size: int = 4) -> dict[str, torch.Tensor]:
    """``"{layer_idx}.{module}"`` -> [out_features] float32: the mean over tokens of the squared
    gradient of the next-token loss with respect to each output of every Linear in `layers`."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def accumulate(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            grad = grad_output[0].detach().float().reshape(-1, grad_output[0].shape[-1])  # [tokens, out]
            sums[name] = sums.get(name, 0) + grad.square().sum(dim=0)
        return accumulate

    for layer_idx, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_full_backward_hook(hook(f"{layer_idx}.{name}")))
    tokens = 0
    embed = model.get_input_embeddings()
    frozen = [param for param in model.parameters() if param.requires_grad]
    for param in frozen:  # gradients of the outputs only: no weight gradients to compute or hold
        param.requires_grad_(False)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size]
            # gradients reach the Linears through their inputs; no weight needs one
            embeddings = embed(batch).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeddings, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                               reduction="sum")
            loss.backward()
            tokens += batch[:, 1:].numel()
    finally:
        for handle in handles:
            handle.remove()
        for param in frozen:
            param.requires_grad_(True)
    return {name: total / max(tokens, 1) for name, total in sums.items()}
