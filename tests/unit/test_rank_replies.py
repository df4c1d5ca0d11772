"""A slot counts as loaded once every tensor-parallel rank has answered, failed if any did."""
from loraxd.engine.rank_replies import AdapterReplies
from loraxd.protocol.worker import AdapterLoaded


def test_one_rank_passes_answers_through():
    msg = AdapterLoaded(0, "local:a")
    assert AdapterReplies(1).add(msg) is msg


def test_the_last_rank_completes_and_any_error_fails():
    replies = AdapterReplies(3)
    assert replies.add(AdapterLoaded(2, "local:a")) is None
    assert replies.add(AdapterLoaded(5, "local:b")) is None  # another slot, apart
    assert replies.add(AdapterLoaded(2, "local:a", "rank 1: no such file")) is None
    assert replies.add(AdapterLoaded(2, "local:a")) == \
        AdapterLoaded(2, "local:a", "rank 1: no such file")
    assert replies.add(AdapterLoaded(5, "local:b")) is None
    assert replies.add(AdapterLoaded(5, "local:b")) == AdapterLoaded(5, "local:b")


def test_a_replaced_group_forgets_partial_answers():
    replies = AdapterReplies(2)
    assert replies.add(AdapterLoaded(0, "local:a")) is None
    replies.reset()
    assert replies.add(AdapterLoaded(0, "local:a")) is None  # the new group's first answer
    assert replies.add(AdapterLoaded(0, "local:a")) == AdapterLoaded(0, "local:a")


def test_host_memory_holds_what_every_rank_holds():
    replies = AdapterReplies(2)
    assert replies.add(AdapterLoaded(0, "local:a", None, ["/a", "/b", "/c"])) is None
    assert replies.add(AdapterLoaded(0, "local:a", None, ["/c", "/a"])).host_cached == ["/c", "/a"]


def test_the_worker_reports_its_host_lru():
    from types import SimpleNamespace

    from loraxd.worker.adapter_loader import HostCache
    cache = HostCache(budget_bytes=10)
    for path in ("/a", "/b", "/c"):
        cache.put(path, SimpleNamespace(num_bytes=4))
    assert cache.keys() == ["/b", "/c"]  # /a evicted to stay within 10 bytes
