"""The loss's output sensitivities predict how much a change to a Linear costs the model."""

import torch
from torch import nn

from endor_ray.compress.sensitivity import output_sensitivities


def _model_and_text():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than a random init, so that the loss has something to lose
        for param in model.parameters():
            param.mul_(3.0)
    with torch.inference_mode():  # the model's own text: the gradients' covariance is its Fisher
        ids = model.generate(torch.randint(0, 128, (16, 1)), max_new_tokens=31, do_sample=True, top_k=0,
                             pad_token_id=0)
    return model, ids


def _loss(model, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        return float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_every_linear_gets_a_positive_sensitivity_per_output():
    model, ids = _model_and_text()
    sensitivities = output_sensitivities(model, model.model.layers, ids)
    assert set(sensitivities) == {f"{layer}.{name}" for layer in range(2) for name in
                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    for name, values in sensitivities.items():
        module = model.get_submodule(f"model.layers.{name}")
        assert values.shape == (module.out_features,) and bool(torch.isfinite(values).all())
        assert float(values.sum()) > 0
    assert all(param.requires_grad for param in model.parameters())  # left as found


def test_the_predicted_loss_ranks_perturbations_as_the_real_loss_does():
    model, ids = _model_and_text()
    sensitivities = output_sensitivities(model, model.model.layers, ids)
    inputs = {}

    def keep(name):
        def hook(module, args):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, in]
        return hook

    hooks = [model.get_submodule(f"model.layers.{name}").register_forward_pre_hook(keep(name))
             for name in sensitivities]
    base = _loss(model, ids)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(1)
    predicted, actual = [], []
    for name in ("0.self_attn.v_proj", "0.mlp.down_proj", "1.self_attn.q_proj", "1.mlp.up_proj"):
        module = model.get_submodule(f"model.layers.{name}")
        delta = torch.randn(module.weight.shape, generator=generator) * 0.1 * module.weight.std()
        hessian = inputs[name].T @ inputs[name]
        per_row = ((delta @ hessian) * delta).sum(dim=1)
        predicted.append(0.5 * float((sensitivities[name] * per_row).sum()) / ids[:, 1:].numel())
        with torch.no_grad():  # +delta and -delta: the first-order terms (noise of a finite text) cancel
            module.weight.add_(delta)
            plus = _loss(model, ids)
            module.weight.sub_(2 * delta)
            minus = _loss(model, ids)
            module.weight.add_(delta)
        actual.append((plus + minus) / 2 - base)
    order = sorted(range(4), key=predicted.__getitem__)
    assert order == sorted(range(4), key=actual.__getitem__), (predicted, actual)
    for guess, real in zip(predicted, actual):  # to second order: the right size, not only the order
        assert 0.2 < guess / real < 5, (predicted, actual)
