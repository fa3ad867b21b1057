"""Inside the ranks: exit-loss gradients across pipeline stages, and converted logits."""

import torch

from runs import assert_family_logits_match_megatron, flow, probe, write_config


def test_exit_loss_gradient_crosses_pipeline_stages_to_the_embedding(corpus, tmp_path):
    # Only exit 1 (after layer 1) has weight. With PP=4 its block sits on stage 1 of 4: its
    # gradient must travel back through the pipeline to stage 0's embedding.
    grads = {}
    for pp in (1, 4):
        run = tmp_path / f"pp{pp}"
        flow("train", "--config", write_config(run, corpus, parallel={"pipeline": pp},
                                               exit_loss={"weights": [0.0, 1.0, 0.0, 0.0]}),
             "--prepare-only")
        probe(run, run / "probe", "grads", ranks=pp)
        grads[pp] = torch.load(run / "probe" / "embedding_grad.pt")
    assert grads[1].abs().max() > 1e-6
    torch.testing.assert_close(grads[4], grads[1], rtol=1e-4, atol=1e-7)


def test_tp2_pp2_checkpoint_converts_to_a_family_with_the_same_logits(corpus, tmp_path):
    run = tmp_path / "tp2pp2"
    flow("train", "--config", write_config(run, corpus, parallel={"tensor": 2, "pipeline": 2},
                                           train={"steps": 3}, checkpoint={"interval": 3},
                                           eval={"interval": 3}))
    assert_family_logits_match_megatron(run, ranks=4)
