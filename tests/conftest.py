import sys

import pytest
import torch

from sodm.checkpoint import save_checkpoint
from sodm.data import dataset_info, load_dataset
from sodm.models import build_model, describe_model


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """A small CNN trained for a few seconds on noisy digits, saved as a sodm checkpoint."""
    torch.manual_seed(0)
    info = dataset_info("digits")
    model = build_model("small_cnn", info.num_classes, info.mean, info.std)
    train = load_dataset("digits", "train")
    x, y = train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        i = torch.randint(0, len(y), (128,))
        loss = torch.nn.functional.cross_entropy(model(x[i] + 0.25 * torch.randn_like(x[i])), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    desc = describe_model("small_cnn", info.num_classes, info.mean, info.std, 1)
    save_checkpoint(path, model, desc, dataset="digits", sigma=0.25, method="gaussian",
                    config={"dataset": "digits", "sigma": 0.25})
    return path


@pytest.fixture
def free_port():
    """A function giving a TCP port free on 127.0.0.1 (for servers a test starts)."""
    from sodm.cluster import free_port

    return free_port


@pytest.fixture(autouse=True)
def no_ray_left_running():
    """Every test shuts down the Ray it starts in this process (a module's shared Ray is started
    before this fixture and stays). A Ray left running here is a second Ray on the machine for
    every later test's own searches, and Train V2's placement-group cleaner then cannot find its
    own ("Found multiple active Ray instances"): stopped trials keep their resources and the
    search hangs."""
    ray = sys.modules.get("ray")
    before = bool(ray and ray.is_initialized())
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test left a Ray instance running in the test process; shut it down")
