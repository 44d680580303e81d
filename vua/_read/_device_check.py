"""The GPU's check of what it received: word sums (see ``_wordsum``) against the ones stored at put time.

The host then only moves bytes; it waits only to learn how many groups passed. Groups
stored without word sums (or whose runs are not whole 4 KiB rows) are checked on the host
with xxh3 instead, by the copy strategy.
"""

from __future__ import annotations

import torch

from vua import _wordsum
from vua._read._job import ReadJob
from vua.errors import FragmentError


class DeviceCheck:
    """Which groups of a job the GPU checks, and the comparison of its sums with the stored ones.

    ``expected[g]`` is group g's stored word sums (K0, V0, K1, ... in file order), or None
    where the host checks the group. A group whose stored sums are malformed ends the
    prefix (the list stops there).
    """

    def __init__(self, job: ReadJob):
        self.job = job
        layout, split = job.layout, job.split
        # Word sums need each head's run of a group to be whole 4 KiB rows (see _wordsum).
        runs = [split * dim * layout.dtype.itemsize for pair in layout.layers for _, dim in pair]
        self.expected: list[list[int] | None] = []
        if not job.verify or not all(_wordsum.whole_rows(n) for n in runs):
            self.expected = [None] * len(job.fragments)
            return
        for group, fragment in enumerate(job.fragments):
            try:
                self.expected.append(fragment.wordsums)
            except FragmentError as exc:
                job.fail(group, exc)
                break

    def on_device(self, first: int, last: int) -> bool:
        """Whether the GPU checks every group of [first, last)."""
        return all(e is not None for e in self.expected[first:last])

    def any_on_device(self, first: int = 0, last: int | None = None) -> bool:
        return any(e is not None for e in self.expected[first:last])

    def on_host(self, group: int) -> bool:
        return self.expected[group] is None

    def group_sums(self, groups: torch.Tensor) -> torch.Tensor:
        """Word sums of whole groups as laid out in their files (uint8 ``(n, group_bytes)`` on
        the device), ``(n, tensors)``; overwrites ``groups``, so use their data first."""
        n = groups.shape[0]
        tensors = 2 * self.job.layout.num_layers  # uniform layout: all the same size
        words = groups.view(torch.int64).view(n * tensors, 1, -1, _wordsum.ROW_WORDS)
        return _wordsum.device_wordsums(words, inplace=True).view(n, tensors)

    def settle(self, sums: torch.Tensor) -> None:
        """Compares the sums the GPU computed, ``(groups, tensors)``, with the stored ones.

        A mismatch ends the prefix. Waits for the GPU (the caller's context): the caller
        must know how many groups are valid.
        """
        valid = self.job.valid
        if not self.any_on_device(0, valid):
            return
        self.cut_at_first_mismatch(sums[:valid].cpu().tolist(), slice(None), "after the copy")

    def cut_at_first_mismatch(self, got: list[list[int]], tensors: slice, where: str) -> None:
        """Ends the prefix at the first group whose sums from the GPU (``got``, per group) differ
        from the stored ones (cut to ``tensors``)."""
        for group in range(self.job.valid):
            stored = self.expected[group]
            if stored is not None and not all(map(_wordsum.matches, got[group], stored[tensors])):
                path = self.job.fragments[group].path
                self.job.fail(group, FragmentError(f"fragment {path}: word sum mismatch {where} (damaged data)"))
                return
