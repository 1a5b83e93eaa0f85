"""HyperAdaLoRA (Zhang et al., "HyperAdaLoRA: Accelerating LoRA Rank Allocation During Training via
Hypernetworks without Sacrificing Performance", arXiv 2510.02630) on peft's AdaLoRA layers.

What the paper states, and what this module does with it:
- AdaLoRA's SVD-form update ``ΔW = P diag(Λ) Q`` (peft: ``lora_B`` = P, out x r; ``lora_E`` = Λ, r x 1;
  ``lora_A`` = Q, r x in), its sensitivity-based pruning of singular values under a cubic budget schedule, and
  its orthogonality regulariser on P and Q are kept: this module uses peft's ``AdaLoraModel`` layers, its
  ``RankAllocator`` and the same regulariser (``||Q Qᵀ - I||_F``, ``||Pᵀ P - I||_F``, averaged, times
  ``orth_reg_weight``).
- P, Λ and Q are not optimised directly: an attention-based hypernetwork generates them, and only the
  hypernetwork's weights receive gradients and optimizer updates.
- Rank allocation prunes the hypernetwork's Λ output: the allocator's mask multiplies the generated Λ.

Choices made where the paper's text available to us was silent (the method section could not be read
offline; see the README's HyperAdaLoRA section), each a constructor argument or written here:
1. Architecture: one BERT-style encoder layer (post-LN multi-head self-attention + GELU feed-forward, as in
   BERT) as a shared trunk; no dropout (the generated parameters are a deterministic function of the
   hypernetwork's weights).
2. Tokens: a matrix is read as its r rank components, one token each: component i is the concatenation of
   Q's row i and P's column i. Attention mixes the components of one matrix (cost O(r² d) per matrix;
   tokens as rows would cost O(d²): 7 s a step for SmolLM2-135M on our CPU in a first version). No
   positional encoding: permuting a matrix's components permutes the generated ones the same way, as the
   SVD form allows.
3. Sharing and heads: one trunk for every adapted matrix; per matrix shape (in, out), an input projection
   (in + out -> hidden) and three output heads generating Q's row, Λ's entry and P's column of each
   component: P, Λ and Q come from one hypernetwork with three outputs, pruning acting on the Λ head.
   Matrices of equal shape are batched. The hypernetwork's size grows with the number of distinct shapes,
   not with depth (a hypernetwork per matrix would cost more than the adapters it generates).
4. Input: fixed, AdaLoRA's random initialisation Θ_0 (P and Q ~ N(0, 0.02²), Λ = 0), one distinct input per
   matrix, and the hypernetwork generates a residual: ``Θ = Θ_0 + H(Θ_0)``, the heads starting at zero so
   the first step uses exactly AdaLoRA's initial adapter. A recurrent reading (input at step t = the
   parameters generated at t-1) was tried first and diverged within two steps (perplexity 7e4 on
   SmolLM2-135M, the smoke configuration): each step re-adds the hypernetwork's output, with no damping.
5. The generated Θ is written into the peft layers after every step: the peft model always holds the
   current adapter, so evaluation, saving and merging are plain peft AdaLoRA and need no hypernetwork.
6. Pruning scores: AdaLoRA's ``|θ · ∂L/∂θ|`` with its two moving averages, computed on the generated
   tensors and their gradients (peft's ``RankAllocator`` reads them from the layers).
7. Step size: each head's output is multiplied by 1 / hidden_size. Adam moves every weight by about the
   learning rate, so a head of fan-in ``hidden`` would move each generated entry ``hidden`` times further
   than Adam moves a directly optimised entry, and coherently across all matrices sharing the head (without
   the factor the smoke run diverged after one step). With it, the protocol's single learning rate means
   the same per-entry step for AdaLoRA and HyperAdaLoRA (the muP rule for output layers).
8. Hyperparameters not given: ``hidden_size`` 64, 4 heads, feed-forward 4 x hidden; the optimizer, learning
   rate and AdaLoRA schedule are the evaluation protocol's, identical to AdaLoRA's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass
class HyperAdaLoraConfig:
    """The hypernetwork's shape and the regulariser's weight (AdaLoRA's default 0.5)."""

    hidden_size: int = 64
    num_heads: int = 4
    ffn_multiple: int = 4
    orth_reg_weight: float = 0.5


class ShapeHeads(nn.Module):
    """For matrices of one shape: components (matrices, r, in + out) -> hidden, and hidden -> the residuals
    of Q's rows (in), Λ (1) and P's columns (out); heads zero-initialised, outputs scaled by 1 / hidden."""

    def __init__(self, in_features: int, out_features: int, hidden: int):
        super().__init__()
        self.project_in = nn.Linear(in_features + out_features, hidden)
        self.q_row, self.singular_value, self.p_column = (nn.Linear(hidden, n) for n in (in_features, 1, out_features))
        for head in (self.q_row, self.singular_value, self.p_column):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.output_scale = 1.0 / hidden  # choice 7

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residuals for (Q rows, Λ, P columns), each (matrices, r, features)."""
        return tuple(self.output_scale * head(hidden) for head in (self.q_row, self.singular_value, self.p_column))


class HyperAdaLoraModel(nn.Module):
    """A peft AdaLoRA model whose P, Λ, Q are generated by one attention hypernetwork.

    Training: ``forward(**batch)`` generates Θ, runs the model with it (``torch.func.functional_call``:
    peft's layers unchanged) and adds the orthogonality penalty to the loss; after ``backward`` and the
    optimizer step, ``after_step(step)`` writes Θ into the layers and runs AdaLoRA's allocator on it.
    Evaluation (``eval()``): the plain peft model with the last generated Θ."""

    def __init__(self, adalora_model, config: HyperAdaLoraConfig | None = None, adapter: str = "default"):
        super().__init__()
        self.config = config or HyperAdaLoraConfig()
        self.peft_model = adalora_model
        self.inner = adalora_model.base_model.model  # the transformers model with peft's SVD layers
        self.adapter = adapter
        self.groups: dict[str, list[str]] = {}  # "in x out" -> prefixes of the SVD layers of that shape
        for name, parameter in self.inner.named_parameters():
            prefix, kind, owner = ["", "", *name.rsplit(".", 2)][-3:]
            if kind in ("lora_A", "lora_B", "lora_E") and owner == adapter:
                parameter.requires_grad_(False)  # the layers hold the generated adapter; nothing optimises them
                if kind == "lora_E":
                    layer = self.inner.get_submodule(prefix)
                    self.groups.setdefault(f"{layer.in_features}x{layer.out_features}", []).append(prefix)
        if not self.groups:
            raise ValueError(f"HyperAdaLoRA: no AdaLoRA adapter '{adapter}' in the model; wrap it with peft first")
        hidden = self.config.hidden_size
        self.trunk = nn.TransformerEncoderLayer(hidden, self.config.num_heads, self.config.ffn_multiple * hidden,
                                                dropout=0.0, activation="gelu", batch_first=True)  # fmt: skip
        self.heads = nn.ModuleDict()
        for key, prefixes in self.groups.items():
            in_features, out_features = (int(n) for n in key.split("x"))
            self.heads[key] = ShapeHeads(in_features, out_features, hidden)
            q0 = torch.stack([self._layer_tensor(p, "lora_A").detach().clone() for p in prefixes])
            p0 = torch.stack([self._layer_tensor(p, "lora_B").detach().T.clone() for p in prefixes])
            self.register_buffer(f"initial_{key}", torch.cat([q0, p0], dim=-1).float())  # (matrices, r, in+out)
        self._generated: dict[str, torch.Tensor] | None = None

    def _layer_tensor(self, prefix: str, kind: str) -> torch.Tensor:
        return self.inner.get_parameter(f"{prefix}.{kind}.{self.adapter}")

    def hypernetwork_parameters(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("peft_model."))

    def rank_mask(self, name: str) -> torch.Tensor | None:
        """The allocator's current keep-mask for a Λ (r x 1 bool), None before its first pruning."""
        pattern = self.peft_model.peft_config[self.adapter].rank_pattern
        if not pattern or name not in pattern:
            return None
        return torch.tensor(pattern[name], dtype=torch.bool).view(-1, 1)

    def generate(self) -> dict[str, torch.Tensor]:
        """Θ = Θ_0 + H(Θ_0) for every adapted matrix, Λ masked: {peft parameter name: tensor} fp32."""
        generated = {}
        for key, prefixes in self.groups.items():
            heads, initial = self.heads[key], self.get_buffer(f"initial_{key}")
            in_features = heads.q_row.out_features
            q_residual, e, p_residual = heads(self.trunk(heads.project_in(initial)))
            q = initial[..., :in_features] + q_residual
            p = initial[..., in_features:] + p_residual
            for index, prefix in enumerate(prefixes):
                name = f"{prefix}.%s.{self.adapter}"
                mask = self.rank_mask(name % "lora_E")
                generated[name % "lora_A"], generated[name % "lora_B"] = q[index], p[index].T
                generated[name % "lora_E"] = e[index] if mask is None else e[index] * mask.to(e.device)
        return generated

    def forward(self, **batch):
        if not self.training:
            return self.peft_model(**batch)
        generated = self.generate()
        for tensor in generated.values():
            tensor.retain_grad()  # AdaLoRA's sensitivity needs ∂L/∂θ of the generated θ
        outputs = functional_call(self.inner, generated, args=(), kwargs=batch, strict=False)
        if getattr(outputs, "loss", None) is not None:
            outputs.loss = outputs.loss + self.config.orth_reg_weight * orthogonality_penalty(generated)
        self._generated = generated
        return outputs

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Write Θ into the layers and run AdaLoRA's allocator on it (call after backward, every step)."""
        if self._generated is None:
            raise RuntimeError("HyperAdaLoRA: after_step called without a training forward before it")
        for name, tensor in self._generated.items():
            parameter = self.inner.get_parameter(name)
            parameter.copy_(tensor)
            parameter.grad = None if tensor.grad is None else tensor.grad.detach()
        self.peft_model.base_model.update_and_allocate(step)  # masks Λ in the layers, records rank_pattern
        for name in self._generated:
            self.inner.get_parameter(name).grad = None
        self._generated = None


def orthogonality_penalty(generated: dict[str, torch.Tensor]) -> torch.Tensor:
    """AdaLoRA's regulariser as peft computes it: mean over P and Q matrices of ``||Q Qᵀ - I||_F`` and
    ``||Pᵀ P - I||_F`` (Frobenius norm, not squared)."""
    terms = []
    for name, matrix in generated.items():
        if ".lora_E." in name:
            continue
        gram = matrix @ matrix.T if ".lora_A." in name else matrix.T @ matrix
        terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)))
    return torch.stack(terms).mean()


def adapter_parameters(peft_model, adapter: str = "default") -> int:
    """Parameters of the adapter as it ends, what a deployed adapter stores (hypernetwork and head excluded):
    AdaLoRA and HyperAdaLoRA, kept triplets x (in + out + 1), the kept ones from the allocator's rank
    pattern (all ``init_r`` before any pruning); LoRA, r x (in + out)."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    pattern = getattr(peft_model.peft_config[adapter], "rank_pattern", None) or {}
    total = 0
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_E:
            kept = sum(pattern.get(f"{name}.lora_E.{adapter}", [True] * module.r[adapter]))
            total += kept * (module.in_features + module.out_features + 1)
        elif isinstance(module, LoraLayer) and adapter in module.lora_A:
            total += module.lora_A[adapter].weight.numel() + module.lora_B[adapter].weight.numel()
    return total
