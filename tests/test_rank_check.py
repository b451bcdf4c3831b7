"""The tensor-parallel agreement check: digests are order- and value-sensitive, and a
disagreement between ranks raises naming the step and what differs."""

import pytest
import torch

from vllm_hass import rank_check


class FakeGroup:
    """Two ranks; the other rank's digest `tamper` (an index) differs from ours by one."""

    def __init__(self, tamper=None):
        self.world_size, self.rank_in_group, self.device = 2, 0, torch.device("cpu")
        self.tamper = tamper

    def all_gather(self, t, dim=0):
        other = t.clone()
        if self.tamper is not None:
            other[0, self.tamper] += 1
        return torch.cat([t, other], dim)


def test_checksum_sees_values_order_and_shape():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert rank_check.checksum(a) == rank_check.checksum(a.clone())
    assert rank_check.checksum(a) != rank_check.checksum(a.flip(1))
    assert rank_check.checksum(a) != rank_check.checksum(a + (a == 6))
    assert rank_check.checksum(a) != rank_check.checksum(a.flatten()[:5])
    assert rank_check.checksum(None) != rank_check.checksum(torch.tensor([]))


@pytest.mark.parametrize("tamper, bad", [(None, None), (0, "tokens"), (1, "path")])
def test_checker_raises_when_ranks_disagree(monkeypatch, tamper, bad):
    import vllm.distributed

    monkeypatch.setattr(vllm.distributed, "get_tp_group", lambda: FakeGroup(tamper))
    check = rank_check.RankChecker()
    parts = dict(tokens=torch.tensor([[5, 7, 9]]), path=torch.tensor([[1, 2]]))
    if bad is None:
        check(**parts)
        check(**parts)
        assert check.step == 2
        return
    with pytest.raises(RuntimeError, match=rf"ranks disagree at step 1 on {bad} "):
        check(**parts)


def test_enabled_by_environment(monkeypatch):
    monkeypatch.delenv(rank_check.ENV, raising=False)
    assert not rank_check.enabled()
    monkeypatch.setenv(rank_check.ENV, "0")
    assert not rank_check.enabled()
    monkeypatch.setenv(rank_check.ENV, "1")
    assert rank_check.enabled()
