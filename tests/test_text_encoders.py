"""Prompt encoding (nanoi2v_diffusers/text_encoders.py): clause by clause with a `clause_separator`."""

import pytest
import torch
from training_fixtures import single_thread, write_tiny_bert  # noqa: F401 (autouse)
from transformers import AutoModel, AutoTokenizer

from nanoi2v_diffusers.data.shapes import CAPTION_CLAUSE_SEPARATOR, ShapesConfig, generate_shapes_clip
from nanoi2v_diffusers.text_encoders import encode_clauses, encode_text, split_clauses

TWO_CLAUSES = "the red circle moves up and to the left and a blue square moves down quickly"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = write_tiny_bert(tmp_path_factory.mktemp("bert"))
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("caption, clauses", [
    (TWO_CLAUSES, ["the red circle moves up and to the left", "a blue square moves down quickly"]),
    ("a green triangle stays still, while the white circle moves right slowly",
     ["a green triangle stays still", "the white circle moves right slowly"]),
    ("the cyan square moves down and to the right", ["the cyan square moves down and to the right"]),
    ("", [""]),
])  # fmt: skip
def test_shapes_captions_split_at_their_joiners_only(caption, clauses):
    assert split_clauses(caption, CAPTION_CLAUSE_SEPARATOR) == clauses


def test_every_generated_caption_splits_into_one_clause_per_object():
    config = ShapesConfig(canvas_size=32, num_frames=5, min_objects=1, max_objects=3)
    for seed in range(40):
        clip = generate_shapes_clip(seed=seed, config=config)
        clauses = split_clauses(clip.caption, CAPTION_CLAUSE_SEPARATOR)
        assert len(clauses) == len(clip.objects)
        assert all(obj.colour in clause and obj.shape in clause for obj, clause in zip(clip.objects, clauses))


def test_separator_with_a_capturing_group_is_refused():
    with pytest.raises(ValueError, match=r"capturing groups.*'\( and \)'"):
        split_clauses(TWO_CLAUSES, "( and )")


def test_clause_tokens_are_each_clause_encoded_alone_and_joined(bert):
    text_encoder, tokenizer = bert
    joined, mask = encode_clauses(text_encoder, tokenizer, [TWO_CLAUSES, "a red circle moves left", ""], 32,
                                  CAPTION_CLAUSE_SEPARATOR)  # fmt: skip
    first, first_mask = encode_text(text_encoder, tokenizer, ["the red circle moves up and to the left"], 32)
    second, second_mask = encode_text(text_encoder, tokenizer, ["a blue square moves down quickly"], 32)
    expected = torch.cat([first[0][first_mask[0].bool()], second[0][second_mask[0].bool()]])
    assert mask[0].sum() == len(expected) and mask[0, : len(expected)].all()
    torch.testing.assert_close(joined[0, : len(expected)], expected)
    # The clause encoding differs from the whole caption's: each clause's tokens see only their own clause.
    whole, _ = encode_text(text_encoder, tokenizer, [TWO_CLAUSES], 32)
    assert not torch.allclose(whole[0, 1 : first_mask.sum() - 1], first[0, 1 : first_mask.sum() - 1], atol=1e-3)
    # One clause: the same as the plain encoding. No text: all masked, all zero.
    single, single_mask = encode_text(text_encoder, tokenizer, ["a red circle moves left"], 32)
    torch.testing.assert_close(joined[1, : single_mask.sum()], single[0, : single_mask.sum()])
    assert mask[2].sum() == 0 and joined[2].abs().max() == 0 and (joined[1][mask[1] == 0] == 0).all()


def test_encode_text_with_a_separator_pads_and_truncates_the_joined_tokens(bert, caplog):
    text_encoder, tokenizer = bert
    embeds, mask = encode_text(text_encoder, tokenizer, [TWO_CLAUSES], 24, pad_to_max_length=True,
                               clause_separator=CAPTION_CLAUSE_SEPARATOR)  # fmt: skip
    assert embeds.shape == (1, 24, 32) and mask.shape == (1, 24)
    short, short_mask = encode_text(text_encoder, tokenizer, [TWO_CLAUSES], 12,
                                    clause_separator=CAPTION_CLAUSE_SEPARATOR)  # fmt: skip
    assert short.shape[1] == 12 and short_mask.all()
    torch.testing.assert_close(short[0], embeds[0, :12])
    assert "over max_sequence_length=12" in caplog.text
