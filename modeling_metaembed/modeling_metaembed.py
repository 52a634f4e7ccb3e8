"""MetaEmbed: a backbone whose appended meta tokens give a small, nested set of embedding vectors.

This file ships inside every checkpoint (remote code): it imports only public torch/transformers APIs and its
flat siblings. Layout of every input (official MetaEmbed layout):

    [visual tokens; text tokens (the whole chat-templated prompt); M_q (R_q query tokens); M_c (R_c candidate tokens)]

A query reads the last-layer states at its R_q positions, a candidate at its R_c positions; L2-normalised.
Under causal attention M_c cannot change M_q, so queries are encoded as [content; M_q] only (`query_layout`).
"""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoProcessor, PreTrainedModel
from transformers.utils import ModelOutput, cached_file
from transformers.utils.logging import get_logger, tqdm

from .configuration_metaembed import MetaEmbedConfig, check_role
from .hub_metaembed import HUB_KWARGS, upload_folder_to_hub, write_atomic
from .modeling_litevl import LiteVLModel
from .processing_litevl import LiteVLProcessor
from .processing_metaembed import MetaEmbedProcessor, parse_inputs, per_item_instructions
from .reasoning_metaembed import (
    GenerativeReasoner,
    generate_traces,
    generator_around,
    load_generative_backbone,
    ties_word_embeddings,
)
from .scoring_metaembed import maxsim

logger = get_logger(__name__)

# Backbones that compute their own (3-D rotary) positions from the attention mask; for every other family
# MetaEmbed passes positions counted over real tokens, so left and right padding give identical embeddings.
FAMILIES_WITH_OWN_POSITIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama")
FIRST_POSITION = {"paligemma": 1}  # PaliGemma counts positions from 1
MLLAMA_IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")

# Backbones whose code ships with MetaEmbed itself (not in transformers), by model type: (model, processor).
BACKBONES_SHIPPED_HERE = {"litevl": (LiteVLModel, LiteVLProcessor)}

MODEL_CARD_NAME = "README.md"
# Code files shipped beside this one that it does not import (sentence-transformers' module imports this file).
# transformers copies only this file and its imports, on save and into its remote-code cache, so save_pretrained
# writes these itself: from beside this file, else as from_pretrained read them from the checkpoint.
CODE_FILES_BESIDE = ("sentence_metaembed.py",)
# sentence-transformers names the module class by its file at the checkpoint root (sentence_metaembed.py).
SENTENCE_TRANSFORMERS_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_metaembed.MetaEmbedModule"}]
SENTENCE_TRANSFORMERS_CONFIG = {
    "model_type": "MultiVectorEncoder",
    "similarity_fn_name": "maxsim",
    "prompts": {},  # no prompts: the MetaEmbed config's default instructions apply
    "default_prompt_name": None,
}


@dataclass
class MetaEmbedOutput(ModelOutput):
    """
    Args:
        embeddings (`torch.FloatTensor` of shape `(batch_size, num_vectors, dim)`):
            L2-normalised float32 meta embeddings of the requested role (R_q vectors for queries, R_c for
            candidates).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            The backbone's last-layer states, returned when `output_hidden_states=True`.
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


def grid_tiles(grid: int, level: int) -> torch.Tensor:
    """[level * level, grid*grid] True where an image token (row-major over a grid x grid feature map) lies in tile
    (r, c) of the level x level split of the grid, tiles row-major; edges at floor(i * grid / level)."""
    index = torch.arange(grid * grid)
    rows, columns = index // grid, index % grid
    edges = [i * grid // level for i in range(level + 1)]
    return torch.stack(
        [
            (rows >= edges[r]) & (rows < edges[r + 1]) & (columns >= edges[c]) & (columns < edges[c + 1])
            for r in range(level)
            for c in range(level)
        ]
    )


def region_pyramid(grid: int, count: int) -> torch.Tensor:
    """[count, grid*grid] the regions of meta_regions="pyramid": True where an image token lies in region k. Levels
    1, 2, 3, ... of `grid_tiles` follow one another until there are `count` regions; past the grid's finest level,
    the whole image."""
    regions, level = [], 1
    while len(regions) < count and level <= grid:
        regions += list(grid_tiles(grid, level))
        level += 1
    regions += [torch.ones(grid * grid, dtype=torch.bool)] * (count - len(regions))
    return torch.stack(regions[:count])


class MetaEmbedPreTrainedModel(PreTrainedModel):
    config_class = MetaEmbedConfig
    base_model_prefix = "vlm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class MetaEmbedModel(MetaEmbedPreTrainedModel):
    """A MetaEmbed retriever: the backbone's base model (no generation head) plus an optional projection.

    Load a checkpoint with `AutoModel.from_pretrained(path_or_id, trust_remote_code=True)`, build a fresh one
    from a backbone with `MetaEmbedModel.from_vlm(...)`, embed with `encode` / `encode_queries` /
    `encode_candidates`, and score with `similarity` at any budget (r_q, r_c).
    """

    def __init__(self, config: MetaEmbedConfig, vlm: PreTrainedModel | None = None):
        super().__init__(config)
        if vlm is None:
            # LiteVL is built directly: under remote code its config class comes from another module copy than the
            # one AutoModel registered, so a lookup by config class would miss it.
            shipped = BACKBONES_SHIPPED_HERE.get(config.vlm_config.model_type)
            vlm = shipped[0](config.vlm_config) if shipped else AutoModel.from_config(config.vlm_config)
        self.vlm = vlm
        # Named so that a PEFT `modules_to_save` suffix match cannot also hit every q_proj/o_proj of the backbone.
        self.output_projection = (
            nn.Linear(config.backbone_hidden_size, config.embedding_dim) if config.embedding_dim else None
        )
        # Think-Then-Embed's unified mode: the backbone's own head, kept when it is not tied to the embeddings.
        if config.keep_lm_head:
            vocab = config.get_text_config().vocab_size
            self.lm_head = nn.Linear(config.backbone_hidden_size, vocab, bias=False)
            # The embedding loss never reaches it: frozen, so DDP sees no unused trainable parameter.
            self.lm_head.requires_grad_(False)
        self.processor: MetaEmbedProcessor | None = None  # attached by from_pretrained / from_vlm
        self.model_card: str | None = None  # the checkpoint's README.md, written back by save_pretrained
        self.code_files_beside: dict = {}  # {name: source} of CODE_FILES_BESIDE read from the checkpoint
        self.post_init()

    # ---------------------------------------------------------------------------------------------------- forward
    def _role_token_ids(self, role: str, device) -> torch.Tensor:
        ids = self.config.query_meta_token_ids if role == "query" else self.config.candidate_meta_token_ids
        if ids is None:
            raise ValueError("config has no meta-token ids: build the model with MetaEmbedModel.from_vlm")
        return torch.as_tensor(ids, device=device)

    def _backbone_states(self, input_ids, attention_mask, backbone_inputs: dict) -> torch.Tensor:
        """The backbone's last-layer states [B, L, H]."""
        cross_mask = backbone_inputs.get("cross_attention_mask")
        if self.config.vlm_config.model_type == "mllama" and cross_mask is not None:
            # Mllama gives a row whose cross-attention is fully masked a gated average of the vision states, so a
            # text row inside a batch with images would differ from the same row alone. Run text rows apart.
            has_image = cross_mask.flatten(1).any(dim=1)
            if not bool(has_image.all()):
                hidden = None
                text_inputs = {k: v for k, v in backbone_inputs.items() if k not in MLLAMA_IMAGE_INPUTS}
                for rows, inputs in ((has_image, backbone_inputs), (~has_image, text_inputs)):
                    if not bool(rows.any()):
                        continue
                    sliced = {
                        k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()
                    }
                    part = self.vlm(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **sliced)
                    if hidden is None:
                        hidden = part.last_hidden_state.new_empty(input_ids.shape + part.last_hidden_state.shape[-1:])
                    hidden[rows] = part.last_hidden_state
                return hidden
        return self.vlm(input_ids=input_ids, attention_mask=attention_mask, **backbone_inputs).last_hidden_state

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        role: str = "candidate",
        output_hidden_states: bool = False,
        **backbone_inputs,
    ) -> MetaEmbedOutput:
        """Embed a processed batch (from `MetaEmbedProcessor`) of one role.

        Args:
            input_ids: (B, L) token ids, each row holding the role's meta tokens.
            attention_mask: (B, L) 1 for real tokens, 0 for padding (either side).
            role: "query" reads the R_q query meta tokens, "candidate" the R_c candidate ones.
            **backbone_inputs: everything else the processor produced (pixel_values, image_grid_thw,
                mm_token_type_ids, token_type_ids, cross_attention_mask, ...), passed to the backbone.
        """
        check_role(role)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        family = self.config.vlm_config.model_type
        if family not in FAMILIES_WITH_OWN_POSITIONS and "position_ids" not in backbone_inputs:
            first = FIRST_POSITION.get(family, 0)
            positions = (attention_mask.long().cumsum(-1) - 1 + first).clamp(min=first)
            if self.config.meta_positions == "spread" and self.config.pooling == "meta_tokens":
                positions = self._spread_meta_positions(input_ids, attention_mask, positions)
            backbone_inputs["position_ids"] = positions
        pixel_values = backbone_inputs.get("pixel_values")
        if pixel_values is not None and pixel_values.is_floating_point():  # processors give float32 pixels
            backbone_inputs["pixel_values"] = pixel_values.to(self.dtype)
        if getattr(self.config.get_text_config(), "use_cache", False):
            backbone_inputs["use_cache"] = False
        backbone_mask = attention_mask
        if self.config.meta_attention == "segments" and self.config.pooling == "meta_tokens":
            backbone_mask = self._segment_mask(input_ids, attention_mask)
        hidden = self._backbone_states(input_ids, backbone_mask, backbone_inputs)  # [B, L, H]

        if self.config.pooling != "meta_tokens":
            states = self._pool_content(hidden, attention_mask, role)  # [B, R, H]
        else:
            states = self._meta_states(hidden, input_ids, role)  # [B, R, H]
        if self.output_projection is not None:
            states = self.output_projection(states)
        embeddings = nn.functional.normalize(states.float(), p=2, dim=-1)  # [B, R, D] float32
        return MetaEmbedOutput(embeddings=embeddings, last_hidden_state=hidden if output_hidden_states else None)

    def _spread_meta_positions(self, input_ids, attention_mask, positions) -> torch.Tensor:
        """meta_positions="spread": meta token j of each meta segment (M_q, M_c) of R tokens takes the position of
        content token floor((j + 1/2) C / R), C the row's real tokens before its first meta token."""
        positions = positions.clone()
        is_meta = torch.zeros_like(input_ids, dtype=torch.bool)
        for role in ("query", "candidate"):
            role_ids = self._role_token_ids(role, input_ids.device)
            matches = input_ids.unsqueeze(-1) == role_ids  # [B, L, R]
            is_meta |= matches.any(-1)
        before = (is_meta.long().cummax(dim=1).values == 0) & attention_mask.bool()  # content: before any meta token
        content = before.sum(dim=1)  # [B]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        for role in ("query", "candidate"):
            role_ids = self._role_token_ids(role, input_ids.device)
            matches = input_ids.unsqueeze(-1) == role_ids  # [B, L, R]
            present = matches.any(dim=1)  # [B, R]
            if not bool(present.any()):
                continue
            where = matches.int().argmax(dim=1)  # [B, R] position of meta token j in each row
            count = len(role_ids)
            j = torch.arange(count, device=input_ids.device)
            target = ((2 * j + 1).unsqueeze(0) * content.unsqueeze(1)) // (2 * count)  # [B, R] content index
            # content index -> its position id (the position of the row's target-th real token)
            first_real = attention_mask.long().argmax(dim=1)  # left padding: real tokens start here
            spread = positions[rows.unsqueeze(1), (first_real.unsqueeze(1) + target).clamp(max=input_ids.shape[1] - 1)]
            positions[rows.unsqueeze(1).expand_as(where)[present], where[present]] = spread[present]
        return positions

    def _segment_mask(self, input_ids, attention_mask) -> torch.Tensor:
        """[B, 1, L, L] attention mask of meta_attention="segments": a token sees the real tokens of its own segment
        and of earlier ones (content = 0, M_q = 1, M_c = 2), as under causal attention between segments. Tokens
        the tokenizer puts after the meta tokens (BERT's [SEP]) form a last segment (3) that no meta token sees:
        its position differs between the query layouts."""
        is_query_meta = torch.isin(input_ids, self._role_token_ids("query", input_ids.device))
        is_candidate_meta = torch.isin(input_ids, self._role_token_ids("candidate", input_ids.device))
        is_meta = is_query_meta | is_candidate_meta
        segment = torch.where(is_meta.long().cummax(dim=1).values.bool(), 3, 0)  # 3 after the first meta token
        segment[is_query_meta] = 1
        segment[is_candidate_meta] = 2
        visible = (segment.unsqueeze(2) >= segment.unsqueeze(1)) & attention_mask.bool().unsqueeze(1)  # [B, Lq, Lk]
        if self.config.meta_regions is not None:
            visible &= ~self._outside_region(input_ids, is_candidate_meta)
        if self.config.vlm_config._attn_implementation == "sdpa":
            return visible.unsqueeze(1)  # boolean: True attends
        dtype = self.vlm.get_input_embeddings().weight.dtype  # eager adds the mask to the scores
        return (
            torch.zeros(visible.shape, dtype=dtype, device=input_ids.device)
            .masked_fill(~visible, torch.finfo(dtype).min)
            .unsqueeze(1)
        )

    def _outside_region(self, input_ids, is_candidate_meta) -> torch.Tensor:
        """[B, L, L] True where candidate meta token k may not look under meta_regions="pyramid": the image tokens
        outside region k of their image's grid (`region_pyramid`)."""
        vlm = self.config.vlm_config
        tokens = vlm.num_image_tokens
        regions = region_pyramid(int(round(tokens**0.5)), self.config.num_candidate_vectors).to(input_ids.device)
        is_image = input_ids == vlm.image_token_id
        within_image = (is_image.long().cumsum(dim=1) - 1) % tokens  # [B, L] index in its image's grid
        rank = is_candidate_meta.long().cumsum(dim=1) - 1  # [B, L] k of each candidate meta token
        allowed = regions[rank.clamp(min=0)]  # [B, Lq, T]: row k's region, for every query position
        inside = allowed.gather(2, within_image.unsqueeze(1).expand(-1, input_ids.shape[1], -1))  # [B, Lq, Lk]
        return is_candidate_meta.unsqueeze(2) & is_image.unsqueeze(1) & ~inside

    def _meta_states(self, hidden, input_ids, role: str) -> torch.Tensor:
        # Find each meta token of the role in each row: robust to padding on either side and to suffixes that
        # a tokenizer adds after the prompt (BERT's [SEP], PaliGemma's "\n").
        role_ids = self._role_token_ids(role, input_ids.device)  # [R]
        matches = input_ids.unsqueeze(-1) == role_ids  # [B, L, R]
        if not bool(matches.any(dim=1).all()):
            raise ValueError(f"some rows lack the {role} meta tokens: process inputs with role={role!r}")
        positions = matches.int().argmax(dim=1)  # [B, R]
        return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, R, H]

    def _pool_content(self, hidden, attention_mask, role: str) -> torch.Tensor:
        """The paper's Table 5 baselines: last real token, mean of real tokens, or R mean-pooled segments."""
        mask = attention_mask.bool()  # [B, L]
        if self.config.pooling == "last_token":
            last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # [B], padding on either side
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].unsqueeze(1)
        rank = mask.long().cumsum(dim=1) - 1  # [B, L] index of each real token among its row's real tokens
        length = mask.sum(dim=1, keepdim=True)  # [B, 1]
        segments = 1 if self.config.pooling == "mean" else self.config.num_vectors(role)
        j = torch.arange(segments, device=hidden.device)  # segment j holds ranks [start_j, end_j)
        start = (j * length) // segments  # [B, R]
        end = torch.maximum(((j + 1) * length) // segments, start + 1)  # never empty, even when L < R
        member = (
            mask.unsqueeze(-1) & (rank.unsqueeze(-1) >= start.unsqueeze(1)) & (rank.unsqueeze(-1) < end.unsqueeze(1))
        )
        weights = member.to(hidden.dtype)  # [B, L, R]
        sums = torch.einsum("blr,blh->brh", weights, hidden)
        return sums / weights.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, R, H]

    # ----------------------------------------------------------------------------------------------------- encode
    def _require_processor(self) -> MetaEmbedProcessor:
        if self.processor is None:
            raise ValueError(
                "this model has no processor: load it with from_pretrained from a folder that holds the processor "
                "files, or set model.processor = MetaEmbedProcessor(...)"
            )
        return self.processor

    @torch.inference_mode()
    def encode(
        self,
        inputs,
        num_vectors: int | None = None,
        role: str = "candidate",
        instruction: str | None = None,
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
        device: str | torch.device | None = None,
        reasoner=None,
        traces: list | None = None,
        trace_cache=None,
    ) -> torch.Tensor:
        """Embed texts, images and text+image pairs into (N, num_vectors, D) float32 unit vectors.

        Args:
            inputs: a list mixing `str` (text), `PIL.Image.Image`, image paths (a whitespace-free `str` ending in an
                image suffix, or a `pathlib.Path`), and `{"text": ..., "image": ...}` dicts.
            num_vectors: how many vectors to keep (a prefix: `encode(x, k)` equals `encode(x)[:, :k]`); defaults to
                the role's full count (R_q = 16 for queries, R_c = 64 for candidates by default).
            role: "candidate" (the default: what you index) or "query" (what you search with).
            instruction: replaces the role's default instruction (config.default_instructions); a list gives one
                per input (None entries keep the default).
            batch_size: inputs per forward pass; inputs are sorted by length and returned in input order.
            show_progress_bar: defaults to showing one when there is more than one batch.
            device: where to run (the model is moved there); defaults to where the model is. On CUDA a float32
                model runs under bf16 autocast; on CPU the model runs in its own dtype (float32 recommended).
            reasoner: Think-Then-Embed: a callable `(items) -> traces` (e.g. a `GenerativeReasoner`, or
                `model.as_reasoner()`; "self" builds the latter) whose trace for each input is embedded with it
                (`config.reasoning_template`). Only for the roles in `config.reasoning_roles` (queries by default).
            traces: precomputed traces instead of a reasoner, one per input (None: no trace for that input).
            trace_cache: a folder (or `TraceCache`) keeping the reasoner's traces by input content: each input is
                reasoned over once across calls.
        """
        check_role(role)
        full = self.config.num_vectors(role)
        if num_vectors is None:
            num_vectors = full
        if not isinstance(num_vectors, int) or isinstance(num_vectors, bool):
            raise ValueError(f"num_vectors must be an integer, got {num_vectors!r}")
        if not 1 <= num_vectors <= full:
            raise ValueError(f"num_vectors={num_vectors} is outside 1..{full}, the number of {role} vectors")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        processor = self._require_processor()
        items = parse_inputs(inputs)  # validates every item before any compute: no partial output
        if reasoner is not None or traces is not None:
            items = self._with_traces(items, role, reasoner, traces, trace_cache, batch_size, show_progress_bar)
        processor.check_items(items)
        instructions = per_item_instructions(instruction, len(items))
        if device is not None:
            self.to(device)
        device = self.device
        was_training = self.training
        self.eval()

        order = sorted(range(len(items)), key=lambda i: items[i].length_key, reverse=True)
        output = torch.empty(len(items), num_vectors, self.config.output_dim, dtype=torch.float32)
        use_autocast = device.type == "cuda" and self.dtype == torch.float32
        num_batches = (len(items) + batch_size - 1) // batch_size
        if show_progress_bar is None:
            show_progress_bar = num_batches > 1
        try:
            for start in tqdm(
                range(0, len(items), batch_size), desc="Encoding", disable=not show_progress_bar, total=num_batches
            ):
                batch_order = order[start : start + batch_size]
                features = processor(
                    [items[i] for i in batch_order], role=role, instruction=[instructions[i] for i in batch_order]
                )
                features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                    embeddings = self(**features, role=role).embeddings
                output[batch_order] = embeddings[:, :num_vectors].float().cpu()
        finally:
            self.train(was_training)
        return output

    def _with_traces(self, items, role, reasoner, traces, trace_cache, batch_size, show_progress_bar) -> list:
        if role not in self.config.reasoning_roles:
            raise ValueError(
                f"this checkpoint conditions {self.config.reasoning_roles} inputs on traces, not {role} inputs "
                "(config.reasoning_roles)"
            )
        if traces is None:
            if isinstance(reasoner, str) and reasoner == "self":
                reasoner = self.as_reasoner()
            if not callable(reasoner):
                kind = type(reasoner).__name__
                raise ValueError(f"reasoner must be a callable (items) -> traces or 'self', got {kind}")
            plain = [{"text": item.text, "image": item.image} for item in items]
            traces = generate_traces(
                reasoner, plain, cache=trace_cache, batch_size=batch_size, show_progress_bar=show_progress_bar
            )
        elif reasoner is not None:
            raise ValueError("give a reasoner or traces, not both")
        return self._require_processor().condition_on_traces(items, list(traces))

    def as_reasoner(self, **generation_kwargs) -> GenerativeReasoner:
        """Unified Think-Then-Embed: this model's own backbone, with its language-model head, as the reasoner.

        The generation model wraps `self.vlm` (no copy: the same weights think and embed) and the head: the input
        embeddings when the backbone ties them, else the head kept at build time (`from_vlm(keep_lm_head=True)`).
        Meta tokens are never generated. `generation_kwargs` go to `GenerativeReasoner` (max_new_tokens, ...)."""
        head = getattr(self, "lm_head", None)
        if head is None and not ties_word_embeddings(self.config.vlm_config):
            raise ValueError(
                "this checkpoint has no language-model head: its backbone does not tie embeddings, and it was built "
                "without keep_lm_head=True (MetaEmbedModel.from_vlm(..., keep_lm_head=True))"
            )
        generator = generator_around(self.vlm, self.config.vlm_config, head, device=self.device)
        generator.generation_config.pad_token_id = self.processor.tokenizer.pad_token_id if self.processor else None
        generation_kwargs.setdefault("prompt", self.config.reasoning_prompt)
        meta_ids = list(self.config.query_meta_token_ids or []) + list(self.config.candidate_meta_token_ids or [])
        generation_kwargs.setdefault("suppress_token_ids", meta_ids)
        name = f"{self.name_or_path or 'metaembed'} (own backbone, {self.fingerprint()})"
        generation_kwargs.setdefault("name", name)
        return GenerativeReasoner(generator.eval(), self._require_processor().processor, **generation_kwargs)

    @torch.no_grad()
    def fingerprint(self) -> str:
        """A cheap digest of the weights (64 strided values of every tensor): traces cached before training are not
        reused after it."""
        import hashlib

        digest = hashlib.sha256()
        for name, parameter in self.named_parameters():
            flat = parameter.detach().flatten()
            digest.update(name.encode() + flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def encode_queries(self, inputs, num_vectors: int | None = None, **kwargs) -> torch.Tensor:
        """`encode` with role="query": (N, num_vectors or R_q, D)."""
        return self.encode(inputs, num_vectors=num_vectors, role="query", **kwargs)

    def encode_candidates(self, inputs, num_vectors: int | None = None, **kwargs) -> torch.Tensor:
        """`encode` with role="candidate": (N, num_vectors or R_c, D)."""
        return self.encode(inputs, num_vectors=num_vectors, role="candidate", **kwargs)

    @staticmethod
    def similarity(queries: torch.Tensor, candidates: torch.Tensor, budget: tuple | None = None) -> torch.Tensor:
        """MaxSim scores (Nq, Nc) float32 at budget (r_q, r_c); see `maxsim`."""
        return maxsim(queries, candidates, budget=budget)

    # ---------------------------------------------------------------------------------------- building and saving
    @classmethod
    def from_vlm(
        cls,
        pretrained_model_name_or_path,
        num_query_vectors: int = 16,
        num_candidate_vectors: int = 64,
        matryoshka_groups=None,
        embedding_dim: int | None = None,
        max_image_tokens: int = 1024,
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        keep_lm_head: bool = False,
        **config_kwargs,
    ) -> "MetaEmbedModel":
        """Turn a backbone checkpoint (a local folder, or a Hub id where the Hub is reachable) into a fresh
        MetaEmbed: its base model, its processor (or tokenizer), and R_q + R_c new special tokens whose embedding
        rows are drawn at random with the per-dimension mean and spread of the existing rows (identical rows would
        give near-identical vectors). `config_kwargs` go to `MetaEmbedConfig` (prompt templates, instructions...).
        `keep_lm_head=True` also keeps the backbone's language-model head (when not tied to its embeddings), so
        the model can reason with its own weights (`as_reasoner`, Think-Then-Embed).
        """
        load_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        head = None
        if keep_lm_head:
            vlm, head = load_generative_backbone(pretrained_model_name_or_path, dtype, trust_remote_code, load_kwargs)
        else:
            vlm = AutoModel.from_pretrained(
                pretrained_model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **load_kwargs
            )
        shipped = BACKBONES_SHIPPED_HERE.get(vlm.config.model_type)
        if shipped:  # its processor ships here, not in transformers
            backbone_processor = shipped[1].from_pretrained(pretrained_model_name_or_path, config=vlm.config)
        else:
            backbone_processor = AutoProcessor.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=trust_remote_code
            )
        # Building the composite config resets the backbone config's attention implementation to None, and a
        # backbone run with None gets no causal mask. Restore the one it was loaded with after building.
        backbone_attention = vlm.config._attn_implementation
        config = MetaEmbedConfig(
            vlm_config=vlm.config,
            num_query_vectors=num_query_vectors,
            num_candidate_vectors=num_candidate_vectors,
            matryoshka_groups=matryoshka_groups,
            embedding_dim=embedding_dim,
            max_image_tokens=max_image_tokens,
            keep_lm_head=head is not None,
            **config_kwargs,
        )
        tokenizer = getattr(backbone_processor, "tokenizer", backbone_processor)
        new_tokens = config.query_meta_tokens + config.candidate_meta_tokens
        clashes = [t for t in new_tokens if t in tokenizer.get_vocab()]
        if clashes:
            raise ValueError(f"the backbone vocabulary already holds meta token(s) {clashes[:3]}")
        tokenizer.add_special_tokens({"additional_special_tokens": new_tokens}, replace_extra_special_tokens=False)
        config.query_meta_token_ids = tokenizer.convert_tokens_to_ids(config.query_meta_tokens)
        config.candidate_meta_token_ids = tokenizer.convert_tokens_to_ids(config.candidate_meta_tokens)

        new_ids = config.query_meta_token_ids + config.candidate_meta_token_ids
        num_rows = vlm.get_input_embeddings().weight.shape[0]
        if max(new_ids) >= num_rows:  # some vocabularies keep spare rows (Qwen): resize only when needed
            vlm.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
        model = cls(config, vlm=vlm)
        if head is not None:  # the kept head, with zero rows for the meta tokens (never generated)
            with torch.no_grad():
                model.lm_head.weight.zero_()
                model.lm_head.weight[: head.weight.shape[0]] = head.weight.to(model.lm_head.weight.dtype)
        model.set_attn_implementation(backbone_attention)
        model._init_meta_token_rows(new_ids, seed)
        model.processor = MetaEmbedProcessor(backbone_processor, config)
        return model

    @torch.no_grad()
    def _init_meta_token_rows(self, new_ids: list, seed: int) -> None:
        weight = self.vlm.get_input_embeddings().weight  # [V, H]
        is_new = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        is_new[new_ids] = True
        existing = weight[~is_new].float()
        mean, std = existing.mean(dim=0), existing.std(dim=0)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(new_ids), weight.shape[1], generator=generator).to(weight.device)
        weight[new_ids] = (mean + std * noise).to(weight.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the MetaEmbed processor stored beside the weights."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        try:
            model.processor = MetaEmbedProcessor.from_pretrained(
                pretrained_model_name_or_path, config=model.config, **hub_kwargs
            )
        except (OSError, ValueError) as error:
            logger.warning(f"no MetaEmbed processor loaded from {pretrained_model_name_or_path}: {error}")
        try:
            card_file = cached_file(pretrained_model_name_or_path, MODEL_CARD_NAME, **hub_kwargs)
        except OSError:  # no card in this checkpoint
            card_file = None
        if card_file is not None:
            model.model_card = Path(card_file).read_text(encoding="utf-8")
        for name in CODE_FILES_BESIDE:
            if not Path(__file__).with_name(name).is_file():
                try:
                    source = cached_file(pretrained_model_name_or_path, name, **hub_kwargs)
                except OSError:  # an older checkpoint without it: save_pretrained warns
                    continue
                model.code_files_beside[name] = Path(source).read_text(encoding="utf-8")
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write a self-contained Hub folder: config.json (with auto_map), code files, safetensors weights, the
        processor and tokenizer files, the sentence-transformers files (sentence_metaembed.py, modules.json and its
        config) and, when the model carries one, its model card (README.md)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        folder = Path(save_directory)
        write_atomic(folder / "modules.json", json.dumps(SENTENCE_TRANSFORMERS_MODULES, indent=2) + "\n")
        write_atomic(
            folder / "config_sentence_transformers.json", json.dumps(SENTENCE_TRANSFORMERS_CONFIG, indent=2) + "\n"
        )
        if self.model_card is not None:
            write_atomic(folder / MODEL_CARD_NAME, self.model_card)
        for name in CODE_FILES_BESIDE:
            beside = Path(__file__).with_name(name)
            source = beside.read_text(encoding="utf-8") if beside.is_file() else self.code_files_beside.get(name)
            if source is None:
                logger.warning(f"{name} is not written to {folder}: this model was loaded from a checkpoint without it")
            else:
                write_atomic(folder / name, source)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        token=None,
        max_shard_size="50GB",
        **unused,
    ):
        """Upload exactly the folder `save_pretrained` writes (code, weights, processor, sentence-transformers
        files and `model.model_card` as README.md) to `repo_id`, as `metaembed publish` does."""
        if unused:
            raise TypeError(f"push_to_hub got unexpected arguments {sorted(unused)}")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            return upload_folder_to_hub(folder, repo_id, private, revision, create_pr, commit_message, token)


MetaEmbedConfig.register_for_auto_class()
MetaEmbedModel.register_for_auto_class("AutoModel")

__all__ = ["MetaEmbedModel", "MetaEmbedPreTrainedModel", "MetaEmbedOutput"]
