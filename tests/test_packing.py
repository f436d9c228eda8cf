"""Packed documents (transformers' padding-free inputs): ``position_ids`` restarting per document and/or
``cu_seq_lens_q`` make every block run each document alone, so a packed batch equals the documents run separately
(outputs and gradients), for every registered block and the hybrids; every block takes a packed row in one call (its
ops' ``cu_seqlens``, masks, restarted positions, the LSTM's ``PackedSequence``); bad packing inputs are refused by
name."""
import pytest
import torch
from transformers import DataCollatorWithFlattening

from test_blocks import make_block
from test_generate import IDS, MODELS, VOCAB, tiny
from test_packed_ops import NoReadBack
from zoo.cache import ZooCache
from zoo.layers.base import Documents, SequenceMixer, map_state
from zoo.layers.registry import MIXERS

LENGTHS = [[5, 1, 7], [13]]  # row 0: three documents (one of a single token), row 1: one


def packed_batch(lengths: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """``input_ids [B, T]`` of the rows' documents side by side, their ``position_ids`` and the documents."""
    torch.manual_seed(1)
    docs = [[torch.randint(1, VOCAB, (n,)) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])  # [B, T]: every row of LENGTHS sums to the same T
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])  # [B, T]
    return ids, pos, docs


def test_every_registered_block_takes_packed_documents_in_one_call():
    assert all(MIXERS.get(name).cls.packs_documents for name in MIXERS.names())


@pytest.mark.parametrize("blocks", [["rwkv7", "rwkv7"], ["mamba", "attention"]], ids="+".join)
def test_a_block_without_packs_documents_runs_each_document_alone(blocks, monkeypatch):
    """The fallback of blocks that cannot take packed documents (a new block's default): ``SequenceMixer`` runs each
    document alone, with a shared tensor (RWKV-7's v_first, written by layer 0 and read by layer 1) cut and joined
    per document; the model's output is the native one's."""
    model = tiny(blocks).float()
    ids, pos, _ = packed_batch(LENGTHS)
    native = model(ids, position_ids=pos, use_cache=False).logits
    for name in set(blocks):
        monkeypatch.setattr(MIXERS.get(name).cls, "packs_documents", False)
    calls = []
    original = SequenceMixer._each_document
    monkeypatch.setattr(SequenceMixer, "_each_document", lambda self, *a: calls.append(self) or original(self, *a))
    torch.testing.assert_close(model(ids, position_ids=pos, use_cache=False).logits, native, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(model.model.layers)


def _flat(state) -> list[torch.Tensor]:
    out = []
    map_state(state, lambda t: out.append(t) or t)
    return out


@pytest.mark.parametrize("name", MIXERS.names())
def test_a_blocks_packed_call_equals_its_documents_run_alone(name, monkeypatch):
    """One call over the packed row (never the per-document fallback): each document's outputs, and the last
    document's state, as if it ran alone (fp64). Documents of 5, 1 and 7 tokens: one shorter than the conv, boundaries
    inside every chunk. The call reads no tensor back to the host (the boundaries go to the ops as host ints)."""
    block = make_block(name)
    monkeypatch.setattr(SequenceMixer, "_each_document", lambda *a: pytest.fail(f"{name} fell back to one call per document"))
    x = torch.randn(1, 13, block.d_model, dtype=torch.float64)
    shared = {} if block.shared_tensor is None else {block.shared_tensor: torch.randn_like(x)}
    documents = Documents.from_bounds([0, 5, 6, 13], x.device)
    with NoReadBack():
        packed, state = block(x, None, dict(shared), documents)
    alone = []
    for start, end in ((0, 5), (5, 6), (6, 13)):
        y, last = block(x[:, start:end], None, {k: t[:, start:end] for k, t in shared.items()})
        alone.append(y)
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-10, rtol=1e-10)
    for got, want in zip(_flat(state), _flat(last), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device syncs exist only there)")
@pytest.mark.parametrize("name", MIXERS.names())
def test_a_blocks_packed_call_makes_no_device_sync_on_gpu(name):
    """On CUDA, torch's sync debug mode turns every device-to-host synchronisation into an error: a block's packed
    forward with the documents built beforehand makes none (the CPU test above checks the explicit reads)."""
    block = make_block(name).float().cuda()
    x = torch.randn(1, 300, block.d_model, device="cuda")
    shared = {} if block.shared_tensor is None else {block.shared_tensor: torch.randn_like(x)}
    documents = Documents.from_bounds([0, 100, 101, 300], x.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x, None, shared, documents)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("blocks, ffn", MODELS, ids=IDS)
def test_packed_equals_each_document_alone_outputs_and_gradients(blocks, ffn):
    model = tiny(blocks, ffn).float()
    ids, pos, docs = packed_batch(LENGTHS)
    weights = torch.randn(*ids.shape, VOCAB)  # [B, T, V]: a loss that reaches every logit

    model.zero_grad()
    packed = model(ids, position_ids=pos, use_cache=False).logits  # [B, T, V]
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    alone = []
    for b, row in enumerate(docs):
        at = 0
        for doc in row:
            logits = model(doc[None], use_cache=False).logits  # [1, n, V]
            (logits * weights[b : b + 1, at : at + len(doc)]).sum().backward()
            alone.append(logits[0].detach())
            at += len(doc)
    separate = torch.cat(alone).view(*ids.shape, VOCAB)
    assert (packed.detach() - separate).abs().max() <= 1e-5
    separate_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert packed_grads.keys() == separate_grads.keys()
    for name, grad in packed_grads.items():  # one call sums over every token at once: fp32 rounding of the grad's scale
        scale = float(separate_grads[name].abs().max())
        torch.testing.assert_close(grad, separate_grads[name], atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=lambda m: f"{name}: {m}")

    without = model(ids, use_cache=False).logits  # the same tokens as one sequence per row: documents see each other
    assert (without[0, 5:] - packed[0, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("blocks", [["attention"], ["mamba2"], ["rwkv7", "attention"]], ids="+".join)
def test_hf_padding_free_collator_equals_the_padded_batch(blocks):
    """What ``DataCollatorWithFlattening`` produces (one row, position_ids, cu_seq_lens_q, labels with -100 at each
    document's first token) gives the padded batch's logits at every token and its loss."""
    model = tiny(blocks).float()
    torch.manual_seed(2)
    docs = [torch.randint(1, VOCAB, (n,)).tolist() for n in (6, 3, 9)]
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    assert flat["position_ids"].shape == flat["input_ids"].shape == (1, 18)
    out = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], cu_seq_lens_q=flat["cu_seq_lens_q"],
                labels=flat["labels"], use_cache=False)

    T = max(map(len, docs))
    padded = torch.tensor([d + [0] * (T - len(d)) for d in docs])  # [3, T], right padding
    mask = torch.tensor([[1] * len(d) + [0] * (T - len(d)) for d in docs])
    labels = padded.masked_fill(mask == 0, -100)
    reference = model(input_ids=padded, attention_mask=mask, labels=labels, use_cache=False)
    real = torch.cat([reference.logits[i, : len(d)] for i, d in enumerate(docs)])  # [18, V]
    assert (out.logits[0] - real).abs().max() <= 1e-5
    assert float(out.loss) == pytest.approx(float(reference.loss), abs=1e-5)


def test_packed_attention_maps_are_block_diagonal():
    model = tiny(["attention"]).float()
    ids, pos, _ = packed_batch(LENGTHS)
    maps = model(ids, position_ids=pos, use_cache=False, output_attentions=True).attentions[0]  # [B, H, T, T]
    doc = torch.tensor([0] * 5 + [1] + [2] * 7)  # row 0's document of each position
    across = doc[:, None] != doc[None, :]
    assert maps[0][:, across].abs().max() == 0 and maps[1].sum(-1).allclose(torch.ones(()))
    assert maps[0].sum(-1).allclose(torch.ones(()))


@pytest.mark.parametrize("blocks", [["attention"], ["mamba2"], ["lstm", "rwkv7"]], ids="+".join)
def test_a_packed_prefill_keeps_each_rows_last_document_for_decoding(blocks):
    model = tiny(blocks).float()
    ids, pos, docs = packed_batch(LENGTHS)
    cache = ZooCache(len(model.model.layers))
    model(ids, position_ids=pos, cache=cache, use_cache=True)
    step = torch.randint(1, VOCAB, (2, 1))
    packed_next = model(step, cache=cache, use_cache=True).logits[:, -1]  # [B, V]
    for b, row in enumerate(docs):
        alone = model(torch.cat([row[-1], step[b]])[None], use_cache=False).logits[0, -1]
        assert (packed_next[b] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"position_ids": torch.tensor([[1, 2, 3, 4]])}, "row 0 starts at position 1"),
    ({"position_ids": torch.tensor([[0, 1, 3, 4]])}, "goes from 1 to 3 at index 2"),
    ({"position_ids": torch.tensor([[0, 1, 2]])}, "expected shape [1, 4]"),
    ({"cu_seq_lens_q": torch.tensor([0, 2, 3])}, "cumulative document lengths 0, ..., 4"),
    ({"cu_seq_lens_q": torch.tensor([0, 3, 2, 4])}, "cumulative document lengths"),
    ({"cu_seq_lens_q": torch.tensor([0, 2, 4]), "position_ids": torch.tensor([[0, 1, 2, 0]])}, "different places"),
])
def test_bad_packing_inputs_are_refused(kwargs, message):
    model = tiny(["attention"])
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        model(torch.tensor([[1, 2, 3, 4]]), use_cache=False, **kwargs)


def test_a_cache_continuation_cannot_begin_a_document():
    model = tiny(["mamba2"])
    cache = ZooCache(len(model.model.layers))
    model(torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="continues a cache cannot begin a new document"):
        model(torch.tensor([[4, 5]]), position_ids=torch.tensor([[3, 0]]), cache=cache, use_cache=True)
    out = model(torch.tensor([[4, 5]]), position_ids=torch.tensor([[3, 4]]), cache=cache, use_cache=True)
    assert out.logits.shape == (1, 2, VOCAB)


def test_document_positions_restart_after_each_end_of_text():
    from zoo.training import document_positions

    E = 9
    inputs = torch.tensor([[3, 4, E, 5, E, E, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    targets = torch.tensor([[4, E, 5, E, E, 6, 7, 8], [2, 3, 4, 5, 6, 7, 8, 1]])
    positions, kept = document_positions(inputs, targets, E)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert kept.tolist() == [[4, E, -100, E, -100, -100, 7, 8], targets[1].tolist()]


def _tiny_recipe(tmp_path, packing, **extra):
    from conftest import tiny_overrides
    from zoo.recipe_loader import load_recipe

    data = tmp_path / "docs"
    data.mkdir(exist_ok=True)
    for i in range(12):
        (data / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 3))
    overrides = tiny_overrides(tmp_path, **{"data.source": str(data), "data.cache_dir": str(tmp_path / "cache"),
                                            "data.val_fraction": 0.3, "data.packing": packing, "trainer.accelerator": "cpu",
                                            "trainer.precision": "32-true", **extra})
    return load_recipe("mamba2_small", overrides)


def test_documents_packing_loss_is_each_documents_own_loss(tmp_path):
    """The training loss of a documents-packed window is the mean over its documents' own next-token losses (each
    run alone from an empty state), without the targets that cross a boundary."""
    import torch.nn.functional as F

    from zoo.training import ZooLightningModule

    E = 2
    module = ZooLightningModule(_tiny_recipe(tmp_path, "documents", **{"model.vocab_size": VOCAB}), {"eos_token_id": E})
    window = torch.tensor([[5, 6, 7, E, 8, 9, E, 10, 11, 12, 13, E, 14]])  # [1, T + 1]: 3 documents and a cut one
    loss, _ = module.loss_and_output(window)
    losses = []
    for doc in ([5, 6, 7, E], [8, 9, E], [10, 11, 12, 13, E], [14]):
        if len(doc) > 1:
            logits = module.model(torch.tensor([doc[:-1]]), use_cache=False).logits[0]  # [n - 1, V]
            losses.append(F.cross_entropy(logits, torch.tensor(doc[1:]), reduction="none"))
    assert float(loss) == pytest.approx(float(torch.cat(losses).mean()), abs=1e-5)


def test_documents_packed_recipe_trains_and_resumes_exactly(tmp_path, monkeypatch):
    """A documents-packed run stopped by SIGTERM during step 2 and resumed writes the uninterrupted run's metrics.csv;
    the same recipe with concat packing learns something else."""
    import csv
    import os
    import signal

    from zoo.reliability import PreemptedError
    from zoo.train import train
    from zoo.training import ZooLightningModule

    def rows(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader((run / "metrics.csv").open())]

    train(_tiny_recipe(tmp_path, "documents", **{"output_dir": str(tmp_path / "whole")}))
    original = ZooLightningModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # zoo's handler only sets a flag; the step finishes, then it saves
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ZooLightningModule, "training_step", training_step)
    with pytest.raises(PreemptedError):
        train(_tiny_recipe(tmp_path, "documents", **{"output_dir": str(tmp_path / "part")}))
    monkeypatch.setattr(ZooLightningModule, "training_step", original)
    assert len(rows(tmp_path / "part")) == 2
    train(_tiny_recipe(tmp_path, "documents", **{"output_dir": str(tmp_path / "part"), "resume": "auto"}))
    assert rows(tmp_path / "part") == rows(tmp_path / "whole") and len(rows(tmp_path / "whole")) == 6
    train(_tiny_recipe(tmp_path, "concat", **{"output_dir": str(tmp_path / "concat")}))
    assert [r["train_loss"] for r in rows(tmp_path / "concat")] != [r["train_loss"] for r in rows(tmp_path / "whole")]


def test_packed_inputs_under_torch_compile_are_refused_not_dropped(monkeypatch):
    model = tiny(["attention"])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match="torch.compile cannot trace"):
        model(torch.tensor([[1, 2, 3, 4]]), position_ids=torch.tensor([[0, 1, 0, 1]]), use_cache=False)


@pytest.mark.parametrize("blocks, time_conditioning", [(("attention",), False), (("mamba", "attention"), True), (("lstm",), False)],
                         ids=["attention", "mamba+attention-time", "lstm"])
def test_a_packed_denoiser_denoises_each_document_alone(blocks, time_conditioning):
    """Masked diffusion with packed documents: the bidirectional denoiser's logits for each document equal the
    document denoised alone (no attention or scan, forward or backward in time, across a boundary), with and without
    adaLN time conditioning (which runs the rows one by one)."""
    from test_diffusion import tiny_config
    from zoo.modeling import ZooForMaskedLM

    model = ZooForMaskedLM(tiny_config(blocks, time_conditioning=time_conditioning)).eval()
    with torch.no_grad():  # adaLN-Zero starts every layer as the identity: give the modulations weights
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.2)
    ids, pos, docs = packed_batch(LENGTHS)
    t = torch.tensor([0.3, 0.7])
    packed = model(ids, position_ids=pos, timesteps=t).logits  # [B, T, V]
    for b, row in enumerate(docs):
        at = 0
        for doc in row:
            alone = model(doc[None], timesteps=t[b : b + 1]).logits[0]
            torch.testing.assert_close(packed[b, at : at + len(doc)], alone, atol=1e-5, rtol=1e-5)
            at += len(doc)
    assert (model(ids, timesteps=t).logits[0, :5] - packed[0, :5]).abs().max() > 1e-3  # whole rows: documents see each other


def test_diffusion_documents_packing_nelbo_runs_the_documents_apart(tmp_path):
    """objective: diffusion with data.packing: documents: the NELBO's denoiser call gets each window's document
    positions (from its end-of-text tokens), and a tiny run trains and exports."""
    from zoo.train import train
    from zoo.training import DiffusionLightningModule, document_positions

    recipe = _tiny_recipe(tmp_path, "documents", **{"objective": "diffusion", "model.bidirectional": "true"})
    summary = train(recipe)
    assert summary["val_loss"] > 0 and (tmp_path / "run" / "hf" / "config.json").exists()
    module = DiffusionLightningModule(recipe.with_vocab_size(VOCAB), {"eos_token_id": 2, "mask_token_id": VOCAB - 1})
    seen = []
    original = module.model.forward
    module.model.forward = lambda *a, **kw: seen.append(kw.get("position_ids")) or original(*a, **kw)
    window = torch.tensor([[5, 6, 7, 2, 8, 9, 2, 10, 11]])
    module.loss_and_output(window, 0)
    torch.testing.assert_close(seen[0], document_positions(window[:, 1:], window[:, 1:], 2)[0])
    assert seen[0].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]


@pytest.mark.parametrize("blocks, ffn", MODELS, ids=IDS)
def test_packed_under_bf16_autocast_equals_each_document_alone(blocks, ffn):
    """What GPU users get (bf16-mixed): packed logits under bf16 autocast equal each document's own under the same
    autocast to bf16 rounding (measured at most 0.005 on these logits), with finite gradients."""
    model = tiny(blocks, ffn).float().train()
    ids, pos, docs = packed_batch(LENGTHS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(ids, position_ids=pos, use_cache=False).logits.float()  # [B, T, V]
        with torch.no_grad():
            alone = torch.cat([model(doc[None], use_cache=False).logits[0].float() for row in docs for doc in row])
    packed.square().mean().backward()
    assert (packed.detach() - alone.view_as(packed)).abs().max() <= 0.02
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
