"""A `listen: HOST:PORT` setting ([::1]:PORT for IPv6) read as its host and its port."""

from __future__ import annotations

from typing import TYPE_CHECKING


class ListenAddress:
    """Mixin for a settings model with a validated `listen` field: `.host` and `.port`."""

    if TYPE_CHECKING:
        listen: str

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])
