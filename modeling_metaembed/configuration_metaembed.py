"""Configuration of a MetaEmbed model.

This file ships inside every checkpoint (remote code): it imports only public torch/transformers APIs.
Everything needed to rebuild and run a checkpoint lives here and therefore in its `config.json`.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_litevl import LiteVLConfig  # noqa: F401  importing it registers the LiteVL backbone with AutoConfig

ROLES = ("query", "candidate")

DEFAULT_MATRYOSHKA_GROUPS = [[1, 1], [2, 4], [4, 8], [8, 16], [16, 64]]
# Think-Then-Embed: what the reasoner is asked for, an explanation aimed at the embedding, not an answer.
DEFAULT_REASONING_PROMPT = (
    "Explain briefly what this retrieval query is looking for: the entities, attributes and relations a matching "
    "item must show, and what the image (if any) contributes. Do not answer it.\nQuery: {query}"
)

# Families whose attention over the appended meta tokens is bidirectional: a query must then be encoded with
# the full official layout [content; M_q; M_c], because the candidate tokens after M_q can change M_q's states.
BIDIRECTIONAL_FAMILIES = ("bert", "paligemma", "litevl")


POOLINGS = ("meta_tokens", "last_token", "mean", "segment_mean")
META_ATTENTIONS = ("backbone", "segments")
# Where the meta tokens sit in position: "after_content" (the official layout: positions after the prompt) or
# "spread" (meta token j of a segment of R takes the position of content token floor((j + 1/2) C / R), C the
# content's length), only where MetaEmbed passes the positions of a backbone with absolute position embeddings.
META_POSITIONS = ("after_content", "spread")
SPREAD_POSITION_FAMILIES = ("bert", "litevl")
META_REGIONS = (None, "pyramid")
REGION_FAMILIES = ("litevl",)  # a fixed square grid of image tokens per image
# Bidirectional families that take an explicit [B, 1, L, L] attention mask, so "segments" can be applied.
SEGMENT_MASK_FAMILIES = ("bert", "litevl")


class MetaEmbedConfig(PreTrainedConfig):
    r"""
    Configuration of [`MetaEmbedModel`]: a backbone plus learnable meta tokens whose last-layer states are the
    multi-vector embedding (paper: "MetaEmbed", arXiv 2509.18095).

    Args:
        vlm_config (`dict` or `PreTrainedConfig`):
            The backbone's configuration: a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, PaliGemma,
            Llama-3.2-Vision) or a text-only model (a causal LM such as Qwen3, a BERT-style encoder).
        num_query_vectors (`int`, defaults to 16): R_q, meta tokens (and vectors) per query.
        num_candidate_vectors (`int`, defaults to 64): R_c, meta tokens (and vectors) per candidate.
        matryoshka_groups (`list[list[int]]`): the nested budgets (r_q, r_c) the model was trained with.
        embedding_dim (`int`, *optional*): size of an output projection; `None` keeps the backbone's hidden size.
        query_meta_tokens / candidate_meta_tokens (`list[str]`): the meta tokens' strings in the vocabulary.
        query_meta_token_ids / candidate_meta_token_ids (`list[int]`): their ids.
        query_layout (`str`): "query_only" encodes a query as `[content; M_q]` (exact under causal attention);
            "full" appends `M_q; M_c` to queries too (needed under bidirectional attention). Derived from the
            backbone family when not given.
        prompt_templates (`dict[str, str]`): per role, how the instruction and the text are joined
            (`{instruction}` and `{text}` placeholders).
        default_instructions (`dict[str, str]`): per role, the instruction used when the caller gives none.
        max_image_tokens (`int`, defaults to 1024): images are downscaled so they take at most about this
            many visual tokens (the Qwen default of 16,384 runs out of memory).
        padding_side (`str`): side the processor pads on; embeddings do not depend on it.
        reasoning_template (`str`): Think-Then-Embed: how a reasoner's trace joins an input's text (`{text}`,
            `{trace}`); the trace lands after the query's content and before its meta tokens.
        reasoning_roles (`list[str]`, defaults to `["query"]`): the roles whose inputs are conditioned on traces.
        max_trace_tokens (`int`, defaults to 256): a longer trace is cut to this many tokens, with a warning.
        reasoning_prompt (`str`): the prompt (with `{query}`) asking the reasoner for an embedding-centric
            explanation; stored so that a checkpoint records how its traces were made.
        keep_lm_head (`bool`): keep the backbone's language-model head (when its embeddings are not tied), so the
            checkpoint's own backbone can write traces (`model.as_reasoner()`).
        meta_attention (`str`): "backbone" leaves attention as the backbone has it. "segments" (bidirectional
            encoders: bert, litevl) masks it by segment as a causal backbone would: content tokens do not see
            the meta tokens (they keep their pretrained states), M_q does not see M_c, so queries are exactly
            `[content; M_q]`. Defaults to "segments" for litevl, "backbone" otherwise.
        meta_positions (`str`, defaults to "after_content"): the position ids of the meta tokens. "after_content"
            numbers them after the prompt (the official layout). "spread" (bert, litevl: absolute position
            embeddings) gives meta token j of a segment of R tokens the position of content token
            floor((j + 1/2) C / R), C the content's length, so that position-sensitive attention heads anchor each
            meta token at a different place of the content; the token order (and so the attention mask) is
            unchanged.
        meta_regions (`str`, *optional*): None: every candidate meta token may read the whole input (the paper).
            "pyramid" (litevl, with meta_attention="segments"): candidate meta token k reads the text and region
            k of each image's token grid only, the regions a spatial pyramid in order: the whole image, then its
            2 x 2 tiles, 3 x 3 tiles, 4 x 4 tiles, ... (row-major within a level); tokens past the regions read the
            whole image. Vector 1 stays a summary, and larger budgets add vectors that each hold one part of the
            image. Query meta tokens read everything. Issue 32: free meta tokens all read the whole page evenly,
            so a page's vectors were copies (docs/measurements/quickstart.md).
        pooling (`str`, defaults to "meta_tokens"): how states become vectors. "meta_tokens" is MetaEmbed. The
            paper's Table 5 baselines append no meta tokens: "last_token" and "mean" (one vector per input: set
            R_q = R_c = 1) and "segment_mean" (the real tokens cut into R_q or R_c contiguous segments, each
            mean-pooled).
    """

    model_type = "metaembed"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl")}

    vlm_config: dict | PreTrainedConfig | None = None
    num_query_vectors: int = 16
    num_candidate_vectors: int = 64
    matryoshka_groups: list | None = None
    embedding_dim: int | None = None
    query_meta_tokens: list | None = None
    candidate_meta_tokens: list | None = None
    query_meta_token_ids: list | None = None
    candidate_meta_token_ids: list | None = None
    query_layout: str | None = None
    prompt_templates: dict | None = None
    default_instructions: dict | None = None
    max_image_tokens: int = 1024
    padding_side: str = "right"
    pooling: str = "meta_tokens"
    meta_attention: str | None = None
    meta_positions: str = "after_content"
    meta_regions: str | None = None
    initializer_range: float = 0.02
    reasoning_template: str = "{text}\nReasoning: {trace}"
    reasoning_roles: list | None = None
    max_trace_tokens: int = 256
    reasoning_prompt: str | None = None
    keep_lm_head: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        r_q, r_c = self.num_query_vectors, self.num_candidate_vectors
        for name, value in (("num_query_vectors", r_q), ("num_candidate_vectors", r_c)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.matryoshka_groups is None:
            self.matryoshka_groups = [g for g in DEFAULT_MATRYOSHKA_GROUPS if g[0] <= r_q and g[1] <= r_c]
            if [r_q, r_c] not in self.matryoshka_groups:
                self.matryoshka_groups.append([r_q, r_c])
        self.matryoshka_groups = [[int(a), int(b)] for a, b in self.matryoshka_groups]
        for r_q_g, r_c_g in self.matryoshka_groups:
            if not (1 <= r_q_g <= r_q and 1 <= r_c_g <= r_c):
                raise ValueError(
                    f"matryoshka group ({r_q_g}, {r_c_g}) lies outside (1..{r_q}, 1..{r_c}) vectors per role"
                )
        if self.query_meta_tokens is None:
            self.query_meta_tokens = [f"<|meta_query_{i}|>" for i in range(r_q)]
        if self.candidate_meta_tokens is None:
            self.candidate_meta_tokens = [f"<|meta_candidate_{i}|>" for i in range(r_c)]
        if len(self.query_meta_tokens) != r_q or len(self.candidate_meta_tokens) != r_c:
            raise ValueError("there must be one meta token per query vector and one per candidate vector")
        family = self.vlm_config.model_type
        if self.meta_attention is None:
            self.meta_attention = "segments" if family == "litevl" else "backbone"
        if self.meta_attention not in META_ATTENTIONS:
            raise ValueError(f"meta_attention must be one of {META_ATTENTIONS}, got {self.meta_attention!r}")
        if self.meta_attention == "segments" and family not in SEGMENT_MASK_FAMILIES:
            raise ValueError(
                f"meta_attention='segments' needs a bidirectional encoder {SEGMENT_MASK_FAMILIES}, not {family}"
            )
        if self.meta_positions not in META_POSITIONS:
            raise ValueError(f"meta_positions must be one of {META_POSITIONS}, got {self.meta_positions!r}")
        if self.meta_positions == "spread" and family not in SPREAD_POSITION_FAMILIES:
            raise ValueError(
                f"meta_positions='spread' needs absolute position embeddings {SPREAD_POSITION_FAMILIES}, not {family}"
            )
        if self.meta_regions not in META_REGIONS:
            raise ValueError(f"meta_regions must be one of {META_REGIONS}, got {self.meta_regions!r}")
        if self.meta_regions is not None and (family not in REGION_FAMILIES or self.meta_attention != "segments"):
            raise ValueError(
                f"meta_regions={self.meta_regions!r} needs a backbone with a fixed image-token grid {REGION_FAMILIES} "
                f"and meta_attention='segments' (got {family}, {self.meta_attention!r})"
            )
        if self.query_layout is None:
            # Segment masking makes M_c invisible to M_q, as causal attention does.
            bidirectional = family in BIDIRECTIONAL_FAMILIES and self.meta_attention == "backbone"
            self.query_layout = "full" if bidirectional else "query_only"
        if self.query_layout not in ("query_only", "full"):
            raise ValueError(f"query_layout must be 'query_only' or 'full', got {self.query_layout!r}")
        if self.prompt_templates is None:
            self.prompt_templates = {"query": "{instruction}{text}", "candidate": "{instruction}{text}"}
        if self.default_instructions is None:
            self.default_instructions = {"query": "Query: ", "candidate": ""}
        for name in ("prompt_templates", "default_instructions"):
            missing = [role for role in ROLES if role not in getattr(self, name)]
            if missing:
                raise ValueError(f"{name} has no entry for role(s) {missing}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling in ("last_token", "mean") and (r_q, r_c) != (1, 1):
            raise ValueError(
                f"pooling={self.pooling!r} gives one vector per input: set num_query_vectors = "
                f"num_candidate_vectors = 1 (got {r_q}, {r_c})"
            )
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.reasoning_roles = ["query"] if self.reasoning_roles is None else list(self.reasoning_roles)
        unknown = [role for role in self.reasoning_roles if role not in ROLES]
        if unknown:
            raise ValueError(f"reasoning_roles holds unknown role(s) {unknown}: expected a subset of {ROLES}")
        if "{trace}" not in self.reasoning_template or "{text}" not in self.reasoning_template:
            raise ValueError(
                f"reasoning_template needs {{text}} and {{trace}} placeholders, got {self.reasoning_template!r}"
            )
        limit = self.max_trace_tokens
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"max_trace_tokens must be a positive integer, got {self.max_trace_tokens!r}")
        if self.reasoning_prompt is None:
            self.reasoning_prompt = DEFAULT_REASONING_PROMPT
        if "{query}" not in self.reasoning_prompt:
            raise ValueError(f"reasoning_prompt needs a {{query}} placeholder, got {self.reasoning_prompt!r}")

    @property
    def backbone_hidden_size(self) -> int:
        """The backbone's (language model's) hidden size: the size of a meta embedding before projection."""
        return self.vlm_config.get_text_config().hidden_size

    @property
    def output_dim(self) -> int:
        """D, the size of each output vector."""
        return self.embedding_dim or self.backbone_hidden_size

    def num_vectors(self, role: str) -> int:
        """How many vectors an input of this role gets (R_q or R_c)."""
        check_role(role)
        return self.num_query_vectors if role == "query" else self.num_candidate_vectors

    def meta_tokens(self, role: str) -> list:
        """The meta tokens appended to an input of this role, in order (the layout, not only the ones read)."""
        check_role(role)
        if self.pooling != "meta_tokens":  # pooling baselines read the content tokens themselves
            return []
        if role == "query" and self.query_layout == "query_only":
            return list(self.query_meta_tokens)
        return list(self.query_meta_tokens) + list(self.candidate_meta_tokens)

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        return self.vlm_config.get_text_config(*args, **kwargs)


def check_role(role) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {ROLES}")


__all__ = ["MetaEmbedConfig"]
