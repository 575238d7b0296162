"""LXT's patches are undone exactly: after ``lxt_whisper`` / ``lxt_clap`` exit, the model
files use transformers' own attention table again, so an attention function registered
later (as tests/test_edits.py registers one) is the one the model runs. LXT's
``patch_attention`` rebinds the table to a plain dict snapshot; left in place, it silently
ran the snapshot instead (how the edits test once failed when an LXT test ran before it in
the same pytest worker)."""

import pytest
import torch
import transformers.models.clap.modeling_clap as hf_clap
import transformers.models.whisper.modeling_whisper as hf_whisper
from test_whisper import hf_config, random_hf
from transformers import AttentionInterface, WhisperForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from jaxspeech.attribution.lxt import _lxt_attention, lxt_whisper


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lxt_patch_whisper")
    random_hf(WhisperForConditionalGeneration, hf_config(), seed=0).save_pretrained(folder)
    return folder


def _calls_after(run):
    """Register a fresh attention function, run ``run(name)``, return how often it was called."""
    calls = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(module)
        return hf_whisper.eager_attention_forward(module, query, key, value, attention_mask,
                                                  **kwargs)
    name = f"jaxspeech_lxt_patch_test_{id(calls)}"
    AttentionInterface.register(name, attention)
    run(name)
    return len(calls)


@pytest.mark.parametrize("cp", [False, True])
def test_lxt_whisper_leaves_transformers_attention_table_in_place(hf_folder, cp):
    with lxt_whisper(hf_folder, cp=cp) as model:
        x = torch.zeros(1, 80, 3000)
        model(input_features=x, decoder_input_ids=torch.ones(1, 2, dtype=torch.long))
    assert hf_whisper.ALL_ATTENTION_FUNCTIONS is ALL_ATTENTION_FUNCTIONS
    assert not ALL_ATTENTION_FUNCTIONS._local_mapping

    hf = WhisperForConditionalGeneration.from_pretrained(hf_folder)

    def run(name):
        hf.config._attn_implementation = name
        with torch.no_grad():
            hf(input_features=torch.zeros(1, 80, 3000),
               decoder_input_ids=torch.ones(1, 2, dtype=torch.long))
    # every attention of the 2 encoder + 1 decoder layers (self and cross) goes through it
    assert _calls_after(run) == 2 + 2


@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("hf_module", [hf_whisper, hf_clap], ids=["whisper", "clap"])
def test_attention_patch_is_undone_exactly(hf_module, cp):
    table, eager = hf_module.ALL_ATTENTION_FUNCTIONS, hf_module.eager_attention_forward
    local = dict(table._local_mapping)
    with _lxt_attention(hf_module, cp):
        assert hf_module.eager_attention_forward is not eager
    assert hf_module.ALL_ATTENTION_FUNCTIONS is table
    assert hf_module.eager_attention_forward is eager
    assert table._local_mapping == local
