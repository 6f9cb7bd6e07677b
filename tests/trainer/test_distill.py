import copy

import torch

from cleandift.trainer.distill import Student, freeze_unused, stratified_timesteps


def test_timesteps_fall_in_their_strata():
    t = stratified_timesteps(500, torch.Generator().manual_seed(0)).view(500, 3)
    for k in range(3):
        assert (t[:, k] >= k * 1000 // 3).all() and (t[:, k] < (k + 1) * 1000 / 3 + 1).all()
    assert t.min() >= 0 and t.max() <= 999
    assert t[:, 0].float().std() > 50  # spread over the stratum, independently per image
    again = stratified_timesteps(500, torch.Generator().manual_seed(0)).view(500, 3)
    assert torch.equal(t, again)


def test_modules_after_the_last_key_are_frozen(extractor):
    unet = copy.deepcopy(extractor.unet).float().requires_grad_(True)
    student = Student(unet, {k: v.channels for k, v in extractor.info.layers.items()})
    frozen = freeze_unused(student, 4, unet.config.cross_attention_dim)
    assert "conv_out" in frozen and "up_blocks.3.resnets.1.conv1" in frozen
    assert not any(n.startswith(("up_blocks.2", "mid_block", "down_blocks")) for n in frozen)
    assert "up_blocks.3.attentions.0.proj_in" not in frozen
    assert not unet.conv_out.weight.requires_grad
    assert unet.up_blocks[3].attentions[0].proj_in.weight.requires_grad
