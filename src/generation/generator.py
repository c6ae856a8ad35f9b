"""``FastGenerator``: the fast decoder's entry point, which runs the search over the model's
steps on the workspace of each batch."""
from __future__ import annotations

import torch

from params import GenerationParams

from . import search
from .graphs import GraphRunner
from .opt import supports
from .options import DecodeOptions


def refusal(model) -> str | None:
    """Why the fast decoder would not give transformers' tokens for ``model``, or None."""
    if not supports(model):
        return ("its language model is not an OPT decoder with do_layer_norm_before and relu "
                "(the only kind the fast decoder runs)")
    unsupported = search.unsupported_settings(model.language_model.generation_config)
    if unsupported:
        return ("the language model's generation config sets " + ", ".join(unsupported)
                + ", which the fast decoder does not implement")
    return None


class FastGenerator(GraphRunner):
    """The fast decoder: ``generate`` runs the search over this runner's steps."""

    def __init__(self, model, eos_token_id: int, pad_token_id: int,
                 options: DecodeOptions = DecodeOptions()):
        reason = refusal(model)
        if reason:
            raise ValueError(f"the fast decoder cannot run this model: {reason}")
        super().__init__(model, pad_token_id, options)
        self.options = options
        self.eos = eos_token_id
        suppress = self.lm.generation_config.suppress_tokens or []
        self.suppress = torch.tensor(sorted(suppress), dtype=torch.long) if suppress else None
        self._suppress_on: dict[torch.device, torch.Tensor] = {}

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, params: GenerationParams) -> list[list[int]]:
        """New token ids per output row (image-major: ``num_captions`` rows per image)."""
        sampling = params.use_nucleus_sampling or params.effective_beams == 1
        per_image = (params.num_captions if params.use_nucleus_sampling else 1) if sampling \
            else params.num_beams
        ws = self._workspace(input_ids.shape[0], per_image, input_ids.shape[1],
                             params.max_length, self.decoder.embed_tokens.weight)
        prefix = self._encode(pixel_values, input_ids, attention_mask, ws)
        special = search.SpecialTokens(self.eos, self.pad, self._suppressed(prefix.logits.device))

        prompt = search.prompt_history(input_ids, attention_mask)

        def step(tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
            return self._run_step(ws, tokens, positions, t)
        if sampling:
            return search.sample(step, prefix, prompt, params, per_image, special,
                                 self.options.overlap)
        return search.beam_search(step, ws.follow_beams, prefix, prompt, params, special,
                                  self.options.overlap)

    def _suppressed(self, device: torch.device) -> torch.Tensor | None:
        """The model's ``suppress_tokens`` on ``device`` (copied there once)."""
        if self.suppress is None:
            return None
        ids = self._suppress_on.get(device)
        if ids is None:
            ids = self._suppress_on[device] = self.suppress.to(device)
        return ids
