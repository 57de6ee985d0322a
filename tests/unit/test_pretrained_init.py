"""Initialisation from local pretrained checkpoints (tiny timm ViT file, tiny BERT directory)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertModel

from mmpretrain.models import LossConfig, ModelConfig, build_model

W, DEPTH, HEADS, VOCAB, LEN = 32, 2, 2, 50, 8


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=W, depth=DEPTH, num_heads=HEADS, num_classes=0)
    with torch.no_grad():  # make every tensor non-trivial (timm inits LayerNorms to 1/0)
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.pth"
    torch.save(vit.state_dict(), path)
    return vit.eval(), str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                     intermediate_size=4 * W, max_position_embeddings=16)
    bert = BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():
        bert.embeddings.LayerNorm.weight.add_(0.1 * torch.randn(W))
    path = tmp_path_factory.mktemp("bert") / "bert_tiny"
    bert.save_pretrained(path)
    return bert.eval(), str(path)


def _cfg(**kw):
    base = dict(image_size=16, patch_size=8, width=W, depth=DEPTH, num_heads=HEADS, embed_dim=16,
                max_text_length=LEN)
    return ModelConfig(**{**base, **kw})


def _ids():
    ids = torch.randint(1, VOCAB, (3, LEN), generator=torch.Generator().manual_seed(2))
    return ids, torch.ones_like(ids)


def test_image_pretrained_reproduces_timm_forward_features(vit_file):
    vit, path = vit_file
    torch.manual_seed(5)
    model = build_model(_cfg(image_pretrained=path), LossConfig(), VOCAB).eval()
    px = torch.randn(2, 3, 16, 16)
    tokens, _ = model.encode_image(px)
    with torch.no_grad():
        ref = vit.forward_features(px)
    torch.testing.assert_close(tokens, ref, rtol=1e-6, atol=1e-6)
    # a randomly initialised model does not (the test is not vacuous)
    rnd = build_model(_cfg(), LossConfig(), VOCAB).eval()
    assert not torch.allclose(rnd.encode_image(px)[0], ref, atol=1e-3)


def test_image_pretrained_with_experts_and_resampled_pos_embed(vit_file):
    vit, path = vit_file
    model = build_model(_cfg(image_pretrained=path, modality_experts=True), LossConfig(), VOCAB).eval()
    px = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.encode_image(px)[0], vit.forward_features(px), rtol=1e-6, atol=1e-6)
    # a larger image: the position embedding is resampled to the new grid, blocks still load
    big = build_model(_cfg(image_pretrained=path, image_size=32), LossConfig(), VOCAB)
    assert big.backbone.image_embed.pos_embed.shape == (1, 17, W)
    torch.testing.assert_close(big.backbone.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)


def test_text_pretrained_reproduces_bert_embeddings(bert_dir):
    bert, path = bert_dir
    model = build_model(_cfg(text_pretrained=path), LossConfig(), VOCAB).eval()
    ids, _ = _ids()
    with torch.no_grad():
        ref = bert.embeddings(input_ids=ids)
    torch.testing.assert_close(model.backbone.text_embed.bert_embeddings(ids), ref, rtol=1e-6, atol=1e-6)
    # text inputs = BERT embeddings + the zero-initialised text-type embedding
    torch.testing.assert_close(model.backbone.text_inputs(ids, torch.ones_like(ids)), ref, rtol=1e-6, atol=1e-6)
    # width/depth match: the encoder layers were copied (qkv = [query; key; value])
    layer = bert.encoder.layer[1]
    qkv = torch.cat([layer.attention.self.query.weight, layer.attention.self.key.weight,
                     layer.attention.self.value.weight])
    torch.testing.assert_close(model.backbone.blocks[1].attn.qkv.weight, qkv)
    torch.testing.assert_close(model.backbone.blocks[1].mlp.fc1.weight, layer.intermediate.dense.weight)


def test_both_pretrained_image_wins_shared_weights_text_fills_experts(vit_file, bert_dir):
    vit, vpath = vit_file
    bert, bpath = bert_dir
    model = build_model(_cfg(image_pretrained=vpath, text_pretrained=bpath, modality_experts=True),
                        LossConfig(), VOCAB).eval()
    blk = model.backbone.blocks[0]
    torch.testing.assert_close(blk.attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(blk.mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(blk.mlp_text.fc1.weight, bert.encoder.layer[0].intermediate.dense.weight)
    px = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.encode_image(px)[0], vit.forward_features(px), rtol=1e-6, atol=1e-6)


def test_dual_encoder_text_pretrained_reproduces_bert(bert_dir):
    bert, path = bert_dir
    model = build_model(_cfg(arch="dual_encoder", text_pretrained=path), LossConfig(), VOCAB).eval()
    ids, mask = _ids()
    mask[0, 5:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model.backbone.text_inputs(ids, mask), ref, rtol=1e-5, atol=1e-5)


def test_missing_or_mismatched_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_model(_cfg(image_pretrained=str(tmp_path / "nope.pth")), LossConfig(), VOCAB)
    bad = tmp_path / "other.pth"
    torch.save({"something.else": torch.zeros(3)}, bad)
    with pytest.raises(ValueError):
        build_model(_cfg(image_pretrained=str(bad)), LossConfig(), VOCAB)
