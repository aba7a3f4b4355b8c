import os
import sys

import pytest
import torch

from sodm.checkpoint import save_checkpoint
from sodm.data import dataset_info, load_dataset
from sodm.models import build_model, describe_model


# Every Ray this test process starts has token auth off. A process keeps the auth mode of its
# first ray.init (Ray turns token auth on and leaves RAY_AUTH_MODE=token in os.environ), and a
# later Ray of the same process started with auth off never runs its actors ("cancelled before it
# started running"); under pytest-xdist a worker runs the test files in an order of its own, so
# no test may count on being the first. The cluster tests run their token-auth Rays in processes
# of their own (sodm.local_cluster).
os.environ["RAY_AUTH_MODE"] = "disabled"


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


# The longest runs' files first: under pytest-xdist (the README's `-n 2 --dist loadfile`: each
# file on one worker, so that a module's Ray or cluster is made once) the two workers start with
# them and the short files fill in after, so that neither worker ends alone with a long run. A
# Ray run leaves a core idle while one of its processes starts; the other file fills it
# (docs/reliability.md: three at once fought over the two cores and took longer).
LONGEST_FIRST = ("tests/test_tune.py::test_a_pbt_search_clones_mutates_and_resumes",  # ~270 s
                 "tests/test_multinode.py::",  # ~350 s
                 "tests/test_distributed.py::",  # ~220 s
                 "tests/test_mlflow.py::test_a_trial_the_scheduler_stops")  # ~60 s


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)),
                    len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: each file's own order is kept
