"""model.compile: where a run compiles its decoder layers, the errors for a choice that cannot run, and
compiled layers (torch.compile's inductor, here on the CPU) giving the eager loss and gradients, with the
GSA kernels outside the graphs and one compile shared by every layer."""
import pytest
import torch

from t2r.errors import T2RError
from t2r.models.modeling_t2r import T2RDecoderLayer
from t2r.train.compiled_layers import compile_layers, decoder_layer_classes, resolve_compile
from t2r.train.config import ModelConfig
from tests.conftest import converted


def test_auto_compiles_on_cuda_only_and_not_under_fsdp():
    assert resolve_compile("auto", "cpu")[0] is False
    assert resolve_compile("auto", "cuda")[0] is True
    assert resolve_compile("always", "cpu")[0] is True
    assert resolve_compile("off", "cuda")[0] is False
    assert resolve_compile("auto", "cuda", sharded=True) == (False, "model.compile: auto, under FSDP")
    assert resolve_compile("always", "cuda", sharded=True) == (True, "model.compile: always, on cuda")
    with pytest.raises(T2RError, match="must be one of auto, always, off"):
        resolve_compile("fast", "cpu")


def test_auto_stays_eager_with_gradient_checkpointing_and_always_compiles():
    assert resolve_compile("auto", "cuda", checkpointing=True) == (
        False, "model.compile: auto, with gradient checkpointing (no faster there; always compiles)")
    assert resolve_compile("always", "cuda", checkpointing=True)[0] is True


def test_yaml_booleans_read_as_off_and_auto():
    assert ModelConfig(source="x", compile=False).compile == "off"
    assert ModelConfig(source="x", compile=True).compile == "auto"
    assert ModelConfig(source="x").compile == "auto"  # the default: compiled on CUDA, eager on a CPU


def test_the_layer_classes_of_both_models_are_found():
    teacher, model, _ = converted()
    assert decoder_layer_classes(model) == (T2RDecoderLayer,)
    assert [c.__name__ for c in decoder_layer_classes(teacher)] == ["LlamaDecoderLayer"]
    with pytest.raises(T2RError, match="names no decoder layer class"):
        compile_layers(torch.nn.Linear(2, 2))


def _loss_and_grads(model, ids, cu_seqlens):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, cu_seqlens=cu_seqlens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("options", [dict(output_norm=True),
                                     # the window hybrid of the SmolLM2 configs: window softmax + GSA, mixed
                                     dict(output_norm=True, window_size=16, use_rope=True, gate_source="f_proj")],
                         ids=["gsa", "window-hybrid"])
def test_compiled_layers_give_the_eager_loss_and_gradients_on_packed_batches(options):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, model, _ = converted(**options)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    ids = torch.randint(2, 258, (1, 80))
    batches = [torch.tensor(cu, dtype=torch.int32) for cu in ([0, 33, 80], [0, 7, 50, 61, 80], [0, 80],
                                                              [0, 5, 9, 30, 31, 70, 80])]
    eager = [_loss_and_grads(model, ids, cu) for cu in batches]
    assert compile_layers(model) == model.config.num_hidden_layers
    assert model.state_dict().keys() == state.keys()  # the folder a run saves keeps its names
    graphs = []
    for (loss, grads), cu in zip(eager, batches):
        c_loss, c_grads = _loss_and_grads(model, ids, cu)
        graphs.append(_unique_graphs())
        assert torch.isfinite(c_loss) and torch.allclose(c_loss, loss, rtol=1e-5)
        assert c_grads.keys() == grads.keys()
        for n, g in grads.items():
            assert torch.allclose(c_grads[n], g, rtol=1e-4, atol=1e-6), n
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("_gsa" in reason for reason in breaks)  # the kernels run outside the graphs
    # every layer shares the compiled code (the graphs do not grow with the depth), and a batch with another
    # number of documents does not compile again
    assert graphs[0] < model.config.num_hidden_layers * 2 and graphs == graphs[:1] * len(graphs)


def test_a_checkpointed_recompute_runs_the_graphs_its_forward_compiled():
    """Under gradient checkpointing the backward recomputes each layer. It must replay the graphs the forward
    ran: a recompute that compiles another variant may save its tensors in another order, which torch's
    checkpoint rejects (a CheckpointError on an H100, when the bench switched peft's input casts back on
    before its backward). `t2r finetune` keeps the backward inside the forward's settings (autocast, peft's
    casts off), so the backward compiles nothing."""
    from t2r.train.config import LoraConfig
    from t2r.train.stages import add_lora, lora_input_casts_off

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, model, _ = converted(output_norm=True)
    model = add_lora(model, LoraConfig(rank=4))
    for p in model.parameters():
        if p.requires_grad:  # trained parameters are fp32, as the finetune loop keeps them
            p.data = p.data.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_layers(model)
    model.train()
    ids = torch.randint(2, 258, (2, 40))

    def step(backward_inside: bool) -> tuple[int, int]:
        with torch.autocast("cpu", dtype=torch.bfloat16), lora_input_casts_off(model):
            loss = model(input_ids=ids, labels=ids).loss
            after_forward = _unique_graphs()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return after_forward, _unique_graphs()

    for _ in range(2):  # as the loop steps: the second step compiles nothing at all
        forward, backward = step(backward_inside=True)
        assert backward == forward
    forward, backward = step(backward_inside=False)  # the pattern that failed on the GPU: new graphs in backward
    assert backward > forward
