"""``df.modal.llm(..., batch=True)``: the rows go through OpenAI's Batch API, at half the price, resumably.

:func:`batch_runtime` gives :func:`modal_magic.llm.llm_frame` what the engine needs to run an LLM
map as batches instead of live requests: a :class:`~.backend.BatchBackend` per run (the cache
still answers the rows it holds, and caches the answers that come back) and the meter the bar
reads. The package, one module per idea:

- :mod:`.requests`: the JSONL lines (``custom_id``: the row's cache key), the worst case each may
  cost, and the split over the API's limits (:data:`SETTINGS`);
- :mod:`.backend`: submit, record the batch id in the cache database at once
  (:mod:`modal_magic.cache.batches`), poll, collect; a batch recorded by an earlier run or
  process is picked up instead of submitted again;
- :mod:`.outcomes`: each row's answer columns or error from the output and error files.

:func:`cancel_batches` cancels recorded batches still running at OpenAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ...backends.base import Runtime
from ..row.limits import Meter
from .backend import BatchBackend, BatchRun, BatchStillRunning
from .outcomes import BatchCancelled, BatchExpired, BatchFailed, BatchLost
from .requests import SETTINGS, BatchSettings

if TYPE_CHECKING:
    from ..row.limits import Request

__all__ = ["BatchBackend", "BatchCancelled", "BatchExpired", "BatchFailed", "BatchLost", "BatchRun", "BatchSettings",
           "BatchStillRunning", "SETTINGS", "batch_runtime", "cancel_batches"]

#: rows the engine hands back per group as batches finish (each group is cached in one write)
ROWS_PER_GROUP = 1000


def batch_runtime(request: Request, batch_price: tuple[float, float] | None, *, api_key: str | None,
                  base_url: str | None, max_output_tokens: int, budget_usd: float | None) -> Runtime:
    """The engine's :class:`~modal_magic.backends.base.Runtime` for a batch run of ``request``.

    Its backend factory makes a :class:`BatchBackend` for each run, the first and every
    ``retry_failed()``, all sharing one :class:`BatchRun` (key, endpoint, the budget spent so far).

    Examples
    --------
    >>> from modal_magic.llm.row.limits import Request
    >>> runtime = batch_runtime(Request(template="{t}", fields=("t",), model="m", into="a"), (0.1, 0.2),
    ...                         api_key="k", base_url=None, max_output_tokens=10, budget_usd=None)
    >>> runtime.backend().name, runtime.meter.cost_usd
    ('openai-batch', 0.0)
    """
    run = BatchRun(request, batch_price, api_key=api_key, base_url=base_url, max_output_tokens=max_output_tokens,
                   budget_usd=budget_usd)
    columns = request.columns
    meter = Meter(batch_price is not None, (columns["tokens_in"], columns["tokens_out"], columns["cost_usd"]))
    return Runtime(meter=meter, backend=run.backend)


def cancel_batches(batch_ids: Sequence[str] | None = None, *, api_key: str | None = None,
                   base_url: str | None = None) -> list[str]:
    """Cancel OpenAI batches that ``batch=True`` runs submitted and no run has collected yet.

    ``batch_ids`` picks some (default: every recorded batch still running at this endpoint). Their
    rows that already ran are kept by OpenAI; running the cell again collects those and gives the
    others a ``BatchCancelled`` error, which ``out.modal.retry_failed()`` submits again. Returns
    the ids of the batches cancelled.

    Examples
    --------
    >>> import modal_magic.llm.batch as batch
    >>> batch.cancel_batches(["batch_not_recorded"], api_key="sk-x")     # doctest: +SKIP
    []
    """
    import openai

    from ...cache.batches import BatchRecords
    from ...cache.default import default_cache
    from ..keys import MissingAPIKey, resolve_api_key, resolve_base_url
    from ..row.session import openai_client_settings

    key = resolve_api_key(api_key)
    if not key:
        raise MissingAPIKey("no OpenAI API key: pass api_key=, set OPENAI_API_KEY, or put it in a .env file")
    records = [r for r in BatchRecords(default_cache().directory).all() if r.collected is None and r.batch_id]
    wanted = {r.batch_id for r in records} if batch_ids is None else set(batch_ids) & {r.batch_id for r in records}
    url, query = openai_client_settings(resolve_base_url(base_url))
    cancelled = []
    with openai.OpenAI(api_key=key, base_url=url, default_query=query) as client:
        for batch_id in sorted(b for b in wanted if b):
            try:
                batch = client.batches.retrieve(batch_id)
            except openai.NotFoundError:
                continue  # recorded for another endpoint
            if batch.status not in ("completed", "expired", "cancelled", "cancelling", "failed"):
                client.batches.cancel(batch_id)
                cancelled.append(batch_id)
    return cancelled
