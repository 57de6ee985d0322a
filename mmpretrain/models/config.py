"""Model and loss sections of the config (owned by the model/losses code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    arch: Literal["unified", "dual_encoder"] = "unified"
    """'unified' (single-stream, ViLT/VLMo family) or 'dual_encoder'."""
    image_size: int = 64
    """Square side of the input image the model is built for: the same fact as ``data.image_size``
    (set one, the other follows; both set and different is an error)."""
    patch_size: int = 8
    """Side of the square image patch one token stands for (the token grid is image_size / patch_size)."""
    image_stem: Literal["patch", "resnet"] = "patch"
    """unified: how pixels become tokens. 'patch': a linear projection of each patch (ViT).
    'resnet': timm's R+ViT hybrid stem (7x7 stride-2 conv, GroupNorm, ReLU, stride-2 max-pool,
    then a patch_size/4 strided conv; the same token grid), whose convolutions see across
    patch borders; exported as timm ``vit_tiny_r_s16_p8_224`` with the run's sizes."""
    width: int = 128
    """Hidden size: of the shared transformer blocks (unified); of the BERT text tower, the image
    features' projection and the fusion (dual_encoder)."""
    depth: int = 4
    """Transformer blocks of the shared stack (unified) or of the BERT text tower (dual_encoder)."""
    num_heads: int = 4
    """Attention heads per block (divides ``width``)."""
    mlp_ratio: float = 4.0
    """Feed-forward hidden size as a multiple of ``width``."""
    embed_dim: int = 128
    """Size of the contrastive projection."""
    max_text_length: int = 32
    """Text positions the model has (its position-embedding rows): at least ``data.max_length``,
    the tokenized length (set one, the other follows; ``data.max_length`` above it is an error)."""
    dropout: float = 0.0
    """Dropout probability in the embeddings and the transformer blocks (0: none)."""
    modality_experts: bool = False
    """VLMo-style per-modality feed-forward experts over shared attention."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less activation memory, one more
    forward of each block)."""
    image_pretrained: str = ""
    """Local timm ViT checkpoint (file) to initialise the image side."""
    text_pretrained: str = ""
    """Local BERT directory to initialise the text side."""
    image_backbone: str = "small_cnn"
    """dual_encoder only: 'small_cnn' or any timm model name (e.g. resnet50)."""
    fusion: Literal["cross_attention", "linear"] = "cross_attention"
    """dual_encoder only: ITM fusion head, 'cross_attention' or 'linear'."""
    logit_scale_init: float = 14.285714285714286
    """Initial logit scale (1 / temperature) of the contrastive logits: 1/0.07, as CLIP."""
    logit_scale_max: float = 100.0
    """Upper clamp of the learned logit scale (CLIP's 100)."""
    vl_expert_layers: int = 2
    """unified + modality_experts: the top N blocks use the vision-language FFN in the fused pass
    (VLMo); lower blocks route image tokens to the image FFN and text tokens to the text FFN."""
    pool: Literal["mean", "cls"] = "mean"
    """Pooling of the unimodal tokens into the contrastive embedding: 'mean' (over non-padding
    tokens) or 'cls' (the [CLS] token); the dual_encoder image tower always mean-pools."""
    image_pool: Literal["same", "mean", "cls", "max"] = "same"
    """unified: pooling of the image tokens into the image embedding, when it differs from
    ``pool`` ('same': as ``pool``). 'max': the channel-wise max over all image tokens ([CLS]
    included; timm's ``global_pool='max'`` with ``pool_include_prefix``): a small object is one
    or two of 64 tokens, and a mean dilutes it with the background (docs/BENCHMARKS.md, "Sixth
    pass")."""
    fusion_depth: int = 1
    """dual_encoder + cross_attention: number of (text -> image) cross-attention layers;
    unified + ``fusion_source: towers``: number of fusion blocks."""
    fusion_source: Literal["inputs", "towers"] = "inputs"
    """unified: what the fused (ITM/MLM) pass starts from. 'inputs': the input embeddings of
    both modalities through the whole shared stack again (ViLT). 'towers': the unimodal outputs
    of the shared stack (the contrastively aligned tokens) through ``fusion_depth`` dedicated
    single-stream blocks (ALBEF/BLIP-style fusion on top of the encoders)."""
    itm_readout: Literal["text_cls", "image_cls"] = "text_cls"
    """unified: the fused-pass token the ITM head reads (through its dense+tanh pooler):
    'text_cls' (the text [CLS], ViLT's layout) or 'image_cls' (the image [CLS])."""
    itm_head: Literal["pooler", "match", "late"] = "pooler"
    """unified: how the ITM logit is read from the fused pass. 'pooler': the ``itm_readout``
    token through a dense+tanh pooler and a 2-way classifier (ViLT's layout; exported as
    ``ViltForImageAndTextRetrieval``). 'match': the fused image tokens pooled as the image
    embedding is (``image_pool``) and the fused text tokens as the text embedding is (``pool``),
    each through the contrastive projection (the same weights), L2-normalised, and the match
    logit a learned per-dimension weighting of their product plus a bias (a diagonal bilinear
    form, initialised to ``logit_scale_init`` x cosine). A pooler over additive features has no
    first-order signal for "do these two match" (each image and each text is a positive in one
    row of three, so the label is uncorrelated with any function of one side alone) and sat at
    the 1:2 prior from scratch; the product gives the fusion blocks a gradient from step 0
    (docs/BENCHMARKS.md "Seventh pass"). 'late': every fused image and every fused text token
    through the contrastive projection, each real text token scored against its best image token
    by the same weighted product, the scores averaged over the text tokens (FILIP/ColBERT late
    interaction): a local image token holds one object's colour and shape together, a pooled
    embedding does not (docs/BENCHMARKS.md "Eighth pass")."""
    fusion_gates: bool = False
    """unified + ``fusion_source: towers``: each fusion block's attention and MLP branch is scaled
    by a per-channel gate initialised to 0, so the fused pass starts as the identity of the
    towers' tokens; with ``itm_head: match`` (which then reads the fused residual stream, before
    ``fusion_norm``) the ITM logit starts as exactly ``logit_scale_init`` x the contrastive cosine
    and the fusion learns only what changes it."""
    itm_contrastive_prior: bool = False
    """unified + ``fusion_source: towers``: the ITM match logit is the head's output plus the
    log-odds that the pair's contrastive logit (``logit_scale`` x cosine of the two embeddings,
    detached) gives on its own: two Gaussians (LDA) fitted to the contrastive logits of the
    ITM positives and negatives seen in training (running means and pooled variance, a buffer
    saved with the model). ITM then starts from what the contrastive objective knows and its
    fusion learns the residual: what a cosine of pooled embeddings cannot see (binding,
    relations)."""

    def check_image_grid(self) -> None:
        """``ValueError`` naming both keys unless the patches tile the image (unified): timm's
        patch embedding would silently drop the pixels past the last whole patch. Run by the
        trainer at start-up, before anything is written; the 'resnet' stem's own rule too."""
        if self.arch != "unified":
            return  # the dual_encoder image tower has no patches
        if self.patch_size < 1 or self.image_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"model.patch_size={self.patch_size} must divide model.image_size={self.image_size} "
                             "(the token grid is image_size / patch_size)")
        if self.image_stem == "resnet" and self.patch_size % 4:
            raise ValueError(f"model.image_stem='resnet' needs model.patch_size a multiple of 4, got {self.patch_size}")


@dataclass
class LossConfig:
    contrastive: Literal["infonce", "triplet"] = "infonce"
    """'infonce' or 'triplet' (hinge over hardest in-batch negative)."""
    contrastive_weight: float = 1.0
    """Weight of the contrastive loss in the total (0 disables it)."""
    itm_weight: float = 1.0
    """Weight of the image-text matching loss in the total; 0 disables ITM (and the fused pass)."""
    triplet_margin: float = 0.2
    """triplet: the hinge margin on cosine similarities."""
    gather: bool = True
    """Gather embeddings (with gradient) across ranks for global negatives."""
    itm_floor: float = 1e-4
    """Probability floor added to each valid candidate when sampling ITM hard negatives."""
    itm_seed: int = 0
    """Seed of the ITM negative sampler (the same on every rank; advanced once per training
    forward by a counter buffer saved with the model)."""
    itm_exchange: Literal["all_to_all", "all_gather"] = "all_to_all"
    """How chosen negatives reach the rank that scores them: 'all_to_all' (indices first, then
    only the chosen rows travel, O(B) per rank) or 'all_gather' (every rank's rows, O(W*B))."""
    triplet_hardest: bool = True
    """triplet: hinge on the hardest negative (VSE++); false sums the hinge over all negatives."""
    itm_random_mix: float = 0.0
    """Share of the ITM negative-sampling distribution that is uniform over the valid negatives
    once the curriculum is over (0: purely hardness-weighted, as ALBEF)."""
    itm_curriculum_steps: int = 0
    """Training forwards over which the uniform share falls linearly from 1 (random negatives)
    to ``itm_random_mix`` (0: no curriculum). Counted by the model's saved forward counter."""
    itm_fraction: float = 1.0
    """Share of the global batch whose ITM triplets (positive, negative text, negative image) are
    scored, hardest mined negatives first (1: every row). Cuts the 3 fused passes per sample."""
    itm_rank_weight: float = 0.0
    """Weight of a pairwise ranking term over the ITM passes (``losses.itm_rank_loss``): each
    row's positive must score above its text negative and its image negative,
    ``softplus(s_neg - s_pos)`` on the match log-odds (RankNet, as retrieval re-rankers are
    trained). ITM's cross-entropy classifies each pair against the 1:2 prior; re-ranking needs the
    order within a row, which this asks for directly. Needs ``itm_weight > 0`` (the same passes,
    no extra cost); reported as ``loss_itm_rank`` / ``itm_rank_acc``."""
    mlm_weight: float = 0.0
    """Masked language modelling on the fused pass (image + masked caption; ViLT/ALBEF/VLMo).
    0 disables it. unified arch only."""
    mlm_prob: float = 0.15
    """Share of caption tokens (not [CLS], the last token, or padding) chosen for MLM; of
    those 80 % become the mask token, 10 % a random token, 10 % stay (BERT)."""
    mlm_mask_token_id: int = -1
    """Id of the mask token; -1: the tokenizer's (filled in by the trainer)."""
    itm_word_negatives: float = 0.0
    """Share of the ITM rows whose text negative is their own caption with one attribute or
    relation word changed (colour or size words swapped, a shape replaced, left/right,
    above/below, top/bottom flipped) instead of the mined caption; rows with no applicable
    change keep the mined one. 0 disables it. Same fused-pass cost (mmpretrain.word_negatives)."""
    itc_word_negatives: float = 0.0
    """Share of the rows whose image also contrasts (InfoNCE, image-to-text) with its own
    caption with one word changed, as one more negative of that row (NegCLIP's hard negative
    captions; the changes of ``itm_word_negatives``). Costs one text pass over those captions.
    0 disables it. Not with the feature cache."""
    itc_token_weight: float = 0.0
    """Weight of a token-level contrastive term (FILIP's late interaction, ``losses.token_info_nce``):
    the score of an image and a caption is the mean over the caption's tokens of each one's best
    image token (cosine of the contrastive projections of the tower tokens), and InfoNCE over the
    gathered batch is taken on it, with the same logit scale. The pooled embedding can tell
    captions apart by any one word, so it never has to hold which shape an object has; a word
    scored against single image tokens has to find its object there. 0 disables it. unified arch;
    not with the feature cache. Costs [B, W*B, L, N] products per rank (computed in chunks)."""
    mlm_word_prob: float = 0.0
    """Probability that a caption token of the word sets (``word_negative_words``: colour,
    size, shape and relation words) is chosen for MLM, instead of ``mlm_prob``; 0: like every
    other token. Masking the words only the image can fill grounds them in the fused pass."""
    word_negative_words: str = "synthetic"
    """The word sets of ``itm_word_negatives`` and ``mlm_word_prob``: 'synthetic' (the caption vocabulary of
    ``mmpretrain shards synthetic``) or a YAML/JSON file of swap/replace/flip groups."""
    word_negative_table: list[list[int]] = field(default_factory=list)
    """The word sets as token ids (filled in by the trainer from the tokenizer, saved with the
    checkpoint config)."""
