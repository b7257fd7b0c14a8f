"""A map's ``budget_usd`` on Modal: book each batch's worst case before it is sent, settle with its measured time.

The same rule as an LLM run's budget (:mod:`modal_magic.llm.row.booking`): the engine asks
:meth:`MapBudget.check` before submitting each batch, and sends it only on ``"book"``. A batch's
worst case is the most container time Modal can bill for it, its input's timeout
(:func:`modal_magic.costs.input_timeout_s`: ``timeout`` × rows × tries, or Modal's 300 s default
when ``timeout`` is unset) times Modal's own tries of a lost input, at the container's rate
(:func:`modal_magic.costs.container_rate`). When it comes back the batch is settled with the time
it measured in its container × the rate; a batch lost with its container is settled at its worst
case (it may have been billed that long). What is spent is the larger of that and the run's
containers' time so far as Modal bills it, start-up and idle containers included
(:meth:`~modal_magic.backends.base.Backend.container_seconds`, fed to :meth:`MapBudget.cost_usd`
as results arrive). The idle tail after the run (``keep_warm``) comes on top: it doesn't depend on
how many batches are sent, and ``keep_warm=0`` stops the containers with the run.
"""

from __future__ import annotations

from .backends import Batch, BatchResult
from .costs import ContainerRate, container_rate, dollars, input_timeout_s
from .llm.row.booking import Bookings, Verdict, verdict
from .llm.row.failures import BudgetExceeded
from .options import MapOptions

__all__ = ["MapBudget"]


class MapBudget:
    """What a Modal map may still send under ``budget_usd``, batch by batch.

    Examples
    --------
    >>> from modal_magic.backends import Batch
    >>> budget = MapBudget(MapOptions.create(backend="modal", cpu=1.0, timeout=10.0, budget_usd=1.0))
    >>> round(budget.worst_usd(Batch(0, [0], [1])), 6) == round(15 * budget.rate.usd_per_second, 6)
    True
    """

    def __init__(self, options: MapOptions) -> None:
        self.options = options
        self.rate: ContainerRate = container_rate(options.gpu, cpu=options.cpu, memory=options.memory)
        self.bookings = Bookings(options.budget_usd)
        self._booked: dict[int, float] = {}
        self._containers_usd = 0.0  # the run's containers' time so far × the rate (0 where not counted)
        self.stopped: str | None = None

    @property
    def spent_usd(self) -> float:
        """Dollars spent so far: the container time the batches that came back measured (lost ones at
        their worst case), or the run's containers' billed time where that is more."""
        return max(self.bookings.spent_usd, self._containers_usd)

    def cost_usd(self, container_seconds: float | None = None) -> float:
        """The run's estimated compute dollars: ``container_seconds`` × the rate where the backend
        counts its containers' lifetimes (:meth:`~modal_magic.backends.base.Backend.container_seconds`),
        else what the batches measured. What it returns is also what the budget counts as spent."""
        if container_seconds is not None:
            self._containers_usd = self.rate.cost(container_seconds)
        return self.spent_usd

    @staticmethod
    def status(compute_usd: float) -> str:
        """The bar's live line for what the run's containers have cost so far.

        Examples
        --------
        >>> MapBudget.status(0.0123)
        '≈ $0.0123 Modal compute so far (estimate)'
        """
        return f"≈ {dollars(compute_usd)} Modal compute so far (estimate)"

    def worst_usd(self, batch: Batch) -> float:
        """The most ``batch`` can cost: its input's timeout, for each of Modal's tries, at the rate."""
        opts = self.options
        rows = opts.batch_size or len(batch.args)  # the Modal function's timeout is set for batch_size rows
        seconds = input_timeout_s(opts.timeout, opts.retries, rows) * (1 + opts.retries)
        return self.rate.cost(seconds)

    def check(self, batch: Batch) -> Verdict:
        """``"book"`` (send it), ``"wait"`` (for batches in flight to settle) or ``"refuse"``."""
        if self.stopped is not None:
            return "refuse"
        if self.bookings.limit_usd is None:
            return "book"
        return verdict(self.bookings.limit_usd, self.spent_usd, self.bookings.in_flight_usd, self.worst_usd(batch))

    def admit(self, batch: Batch) -> tuple[Verdict, int]:
        """:meth:`check` as an :class:`~modal_magic.backends.base.Account` says it: the whole batch or none of it
        (a compute budget keeps the batches as the engine cut them, as it always has)."""
        answer = self.check(batch)
        return answer, len(batch.positions) if answer == "book" else 0

    def book(self, batch: Batch) -> Batch:
        """``batch`` is being sent (after :meth:`check` said ``"book"``); it goes as it is."""
        worst = self.worst_usd(batch)
        self._booked[batch.id] = worst
        self.bookings.book(worst)
        return batch

    def settle(self, result: BatchResult) -> None:
        """``result`` came back: what its container time cost replaces its booking."""
        worst = self._booked.pop(result.batch.id, None)
        if worst is None:
            return
        if result.requeue:  # never started
            actual = 0.0
        elif result.lost is not None:  # it may have run, billed, until its timeout
            actual = worst
        else:
            actual = self.rate.cost(result.elapsed_s)
        self.bookings.release(worst, actual)

    def refusal(self, batch: Batch, rows_left: int) -> BudgetExceeded:
        """The error of every row not sent, once a batch didn't fit (every later one is refused too)."""
        if self.stopped is None:
            limit = self.options.budget_usd or 0.0
            opts = self.options
            seconds = self.worst_usd(batch) / self.rate.usd_per_second
            if opts.timeout is None:
                why = "Modal's default 300 s per input, as timeout= is unset"
            else:
                why = f"timeout={opts.timeout:g}s per row"
                if input_timeout_s(opts.timeout, 0, 1) == 10 and opts.timeout < 5:
                    why += ", Modal's shortest is 10 s"
            if opts.retries:
                why += f", {1 + opts.retries} tries"
            self.stopped = (
                f"budget_usd={limit:g}: {dollars(self.spent_usd)} spent, and the next batch "
                f"({len(batch.args)} row{'s' if len(batch.args) != 1 else ''}) could cost up to "
                f"{dollars(self.worst_usd(batch))} ({seconds:,.0f} container-seconds: {why}; at "
                f"{dollars(self.rate.usd_per_second * 3600)}/h for {self.rate.resources}), which would pass it, so it and the {rows_left - len(batch.args)} rows "
                "after it were not sent. Raise budget_usd, or set a smaller timeout= so each batch books less, "
                "and run again: the finished rows are cached and not paid for twice"
            )
        return BudgetExceeded(self.stopped)
