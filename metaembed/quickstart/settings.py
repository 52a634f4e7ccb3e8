"""The quickstart's settings: every flag of `./run quickstart` (examples/quickstart.py builds its parser from these
fields) and what each default is and why."""

from dataclasses import dataclass, field

from .pages import QUERY_KINDS, PageLayout
from .twemoji import DIRECTIONS

TASKS = ("pages", "emoji")


@dataclass
class QuickstartSettings:
    output_dir: str = "runs/quickstart"
    task: str = "pages"  # "pages": text -> page of several Twemoji; "emoji": one Twemoji <-> its name
    seed: int = 0
    pooling: str = "meta_tokens"  # "last_token" / "mean": the paper's single-vector baselines (R_q = R_c = 1)
    mmr: bool = True  # False: the loss sees only the full budget (the paper's "without MMR" ablation)
    num_query_vectors: int = 4
    num_candidate_vectors: int = 16
    # Queries as [content; M_q]: under LiteVL's bidirectional attention this differs from the official
    # [content; M_q; M_c] layout, but training and inference agree and a query row is R_c tokens shorter.
    query_layout: str = "query_only"
    # Position ids of the meta tokens: "after_content" (the official layout) or "spread" over the content's positions
    # (config.meta_positions; docs/measurements/quickstart.md, "Why the meta vectors do not keep the items apart").
    meta_positions: str = "after_content"
    # "pyramid": candidate meta token k reads region k of a spatial pyramid over the image grid (the whole image, then
    # 2x2, 3x3, 4x4 tiles; config.meta_regions). None: every candidate meta token reads the whole page (the paper's
    # free meta tokens), which after training all read it evenly, so a page's 16 vectors were copies of one summary
    # (picture MRR 0.446 -> 0.512 over seeds, against 0.457 -> 0.913 with the regions; docs/measurements/quickstart.md).
    meta_regions: str | None = "pyramid"
    bf16: bool = False  # bf16 autocast in training (on CPU it pays off only where the CPU has AMX)
    # pages: 192 px = a 6x6 feature grid, 3x3 tokens per item of a 2x2 page; emoji: 96 px = one page cell alone.
    image_size: int | None = None
    page_grid: int = 2  # pages: items per side of a page
    # pages: each round lays out every training emoji once (382 pages of 2x2 per round). 8 (192 steps): at 4 the
    # budget's gain on picture queries did not hold over seeds (docs/measurements/quickstart.md).
    train_rounds: int = 8
    test_rounds: int = 2  # pages: rounds of held-out pages (92 pages of 2x2 each), scored separately and pooled
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 2e-5  # the pretrained text encoder
    projector_learning_rate: float = 1e-3  # the new image projector
    # The meta tokens' embedding rows, new like the projector, at their own rate (the vocabulary's rows stay
    # frozen); None: they learn with the text encoder at `learning_rate`, which left a page's vectors near-copies.
    meta_learning_rate: float | None = 1e-2
    # The text encoder's attention query and key projections, at their own rate (None: with the encoder at
    # `learning_rate`): where the meta tokens look is set by them (docs/measurements/quickstart.md, issue 32).
    attention_learning_rate: float | None = None
    # 0.1, not the paper's 0.03: from fresh meta vectors that are near-copies across inputs, 0.03 drives this
    # small model to the uniform loss log(batch) before it learns anything (docs/measurements/quickstart.md, measured).
    temperature: float = 0.1
    # Weight of a penalty on how alike a page's vectors are in what they say about it (training.loss.vector_redundancy;
    # 0: the paper's loss). Issue 32: trained, a page's 16 vectors are near-copies (docs/measurements/quickstart.md).
    redundancy_weight: float = 0.0
    # Logits = MaxSim / (r_q * tau): every group gets the logit range of (1,1) (see docs/training.md).
    score_normalization: str = "mean"
    warmup_ratio: float = 0.1
    projector_init: str = "closed_form"  # or "random" (the backbone's own initialisation)
    train_pairs: int | None = None  # a prefix of the training emoji (shorter exploration runs)
    test_pairs: int | None = None  # a prefix of the held-out emoji
    freeze_vision: bool = True  # the ImageNet tower stays as it is; projector and text encoder learn
    save_checkpoint: bool = True
    show_progress_bar: bool = True
    budgets: list = field(default_factory=lambda: [[1, 1], [2, 4], [4, 8], [4, 16]])

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.projector_init not in ("closed_form", "random"):
            raise ValueError(f"projector_init must be 'closed_form' or 'random', got {self.projector_init!r}")
        if self.image_size is None:
            self.image_size = 192 if self.task == "pages" else 96
        if self.pooling != "meta_tokens":
            self.num_query_vectors = self.num_candidate_vectors = 1
            self.budgets = [[1, 1]]
        self.budgets = [
            list(b) for b in self.budgets if b[0] <= self.num_query_vectors and b[1] <= self.num_candidate_vectors
        ]

    @property
    def layout(self) -> PageLayout:
        return PageLayout(page_size=self.image_size, grid=self.page_grid, margin=max(2, self.image_size // 32))

    @property
    def groups(self) -> tuple:
        """The query groups the evaluation reports: directions (emoji) or query kinds (pages)."""
        return DIRECTIONS if self.task == "emoji" else QUERY_KINDS


__all__ = ["QuickstartSettings", "TASKS"]
