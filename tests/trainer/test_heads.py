import copy

import torch

from cleandift.trainer.distill import Student, alignment, stratified_timesteps, teacher_features
from cleandift.trainer.heads import Heads


def test_heads_are_the_identity_at_init():
    torch.manual_seed(0)
    heads = Heads({"us6": 16, "mid": 32})
    feats = {"us6": torch.randn(3, 16, 5, 5), "mid": torch.randn(3, 32, 2, 2)}
    out = heads(feats, torch.tensor([10.0, 500.0, 990.0]))
    for key in feats:
        torch.testing.assert_close(out[key], feats[key], rtol=0, atol=0)


def test_fourier_frequencies_are_saved_with_the_heads():
    heads = Heads({"us6": 8})
    state = heads.state_dict()
    assert "conditioning.fourier.weight" in state
    other = Heads({"us6": 8})
    other.load_state_dict(state)
    torch.testing.assert_close(other.conditioning.fourier.weight, heads.conditioning.fourier.weight)


def _student(extractor):
    torch.manual_seed(0)
    unet = copy.deepcopy(extractor.unet).float().requires_grad_(True)
    channels = {k: v.channels for k, v in extractor.info.layers.items()}
    return Student(unet, channels, extractor.info.student_timestep)


def _batch(extractor, photo, photo2, n_images=2):
    pixels = extractor.preprocess([photo, photo2][:n_images], 128)
    x0 = extractor.vae.encode(pixels).latent_dist.mean * 0.18215
    context = extractor.prompts("").expand(n_images, -1, -1)
    t = stratified_timesteps(n_images, torch.Generator().manual_seed(0))
    noise = torch.randn((len(t), *x0.shape[1:]), generator=torch.Generator().manual_seed(1))
    target = teacher_features(extractor.unet, extractor.noise_scheduler, x0, context, t, noise)
    return x0, context, t, target


def test_gradients_reach_student_heads_and_timestep(extractor, photo, photo2):
    student = _student(extractor)
    x0, context, t, target = _batch(extractor, photo, photo2)
    # Give the heads a first step so gradient flows through every branch.
    for p in student.heads.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    loss, _ = alignment(student(x0, context, t), target)
    loss.backward()
    assert student.timestep.grad is not None and student.timestep.grad.abs() > 0
    assert student.unet.conv_in.weight.grad.abs().sum() > 0
    assert student.unet.up_blocks[1].attentions[0].proj_in.weight.grad.abs().sum() > 0
    for key, head in student.heads.heads.items():
        assert head.layers[0].down.weight.grad.abs().sum() > 0, key
    assert student.heads.conditioning.proj.weight.grad.abs().sum() > 0


def test_student_once_equals_the_reference_student_thrice(extractor, photo, photo2):
    student = _student(extractor)
    for p in student.heads.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    x0, context, t, target = _batch(extractor, photo, photo2)
    grads = []
    losses = []
    for repeat in (False, True):
        student.zero_grad()
        loss, _ = alignment(student(x0, context, t, repeat_student=repeat), target)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()
                      if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6,
                                   msg=name)
