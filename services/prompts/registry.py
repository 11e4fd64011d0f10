"""The template registry as a pure fold over sluice.templates.v1.

Every replica reads the same single-partition log from offset 0 and applies
the same rules, so every replica holds the same registry:

- the first ``TemplateVersion`` for a (name, version) in log order wins; a
  later one with another ``event_id`` lost a race between writers and is ignored;
- a ``LabelPointer`` replaces the label's previous pointer (last write wins),
  which is also what compaction keeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.prompts.template_body import TemplateBody, TemplateRejected
from sluice.kafka import RequestFailed
from sluice.logs import get_logger
from sluice.v1 import templates_pb2

log = get_logger()

DEFAULT_LABEL = "production"
# Not a stored label: always the highest version.
LATEST = "latest"


def describe(ref: templates_pb2.TemplateRef) -> str:
    return f"{ref.name}@{ref.version or ref.label or DEFAULT_LABEL}"


def variant_name(variant: templates_pb2.Variant) -> str:
    return variant.name or f"v{variant.version}"


def assign(pointer: templates_pb2.LabelPointer, subject: str) -> templates_pb2.Variant:
    """Sticky, weighted choice: the same subject always lands in the same arm of this experiment."""
    if len(pointer.variants) == 1:
        return pointer.variants[0]
    total = sum(v.weight for v in pointer.variants)
    seed = f"{pointer.name}\0{pointer.label}\0{subject}".encode()
    point = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big") % total
    for variant in pointer.variants:
        if point < variant.weight:
            return variant
        point -= variant.weight
    return pointer.variants[-1]  # unreachable: point < total


@dataclass(frozen=True)
class Resolved:
    body: TemplateBody
    label: str
    variant: str


@dataclass
class Registry:
    versions: dict[str, dict[int, TemplateBody]] = field(default_factory=dict)
    labels: dict[str, dict[str, templates_pb2.LabelPointer]] = field(default_factory=dict)
    # Offset of the next record to apply.
    position: int = 0

    def apply(self, event: templates_pb2.TemplateEvent, offset: int) -> None:
        self.position = offset + 1
        kind = event.WhichOneof("body")
        if kind == "version":
            self._add_version(event.version, offset)
        elif kind == "label":
            pointer = event.label
            if pointer.name in self.versions and all(
                v.version in self.versions[pointer.name] for v in pointer.variants
            ):
                self.labels.setdefault(pointer.name, {})[pointer.label] = pointer
            else:
                log.warning("label ignored: unknown version", offset=offset, template=pointer.name)

    def _add_version(self, version: templates_pb2.TemplateVersion, offset: int) -> None:
        existing = self.versions.get(version.name, {})
        if version.version in existing:
            return  # a concurrent writer lost the race for this number
        try:
            body = TemplateBody.compile(version)
        except TemplateRejected as exc:
            log.warning("version ignored: does not compile", offset=offset, reason=str(exc))
            return
        self.versions.setdefault(version.name, {})[version.version] = body

    def latest(self, name: str) -> int:
        return max(self.versions.get(name, {}), default=0)

    def version(self, name: str, number: int) -> TemplateBody:
        versions = self._versions_of(name)
        if number not in versions:
            raise RequestFailed("NOT_FOUND", f"template.version: {name} has no version {number}")
        return versions[number]

    def _versions_of(self, name: str) -> dict[int, TemplateBody]:
        if name not in self.versions:
            raise RequestFailed("NOT_FOUND", f"template.name: no template named {name!r}")
        return self.versions[name]

    def pointer(self, name: str, label: str) -> templates_pb2.LabelPointer:
        self._versions_of(name)
        pointer = self.labels.get(name, {}).get(label)
        if pointer is None:
            raise RequestFailed("NOT_FOUND", f"template.label: {name} has no label {label!r}")
        return pointer

    def resolve(self, ref: templates_pb2.TemplateRef, subject: str) -> Resolved:
        """The version a request gets; `subject` (tenant + end user) picks the experiment arm."""
        if not ref.name:
            raise RequestFailed("INVALID_ARGUMENT", "template.name: must not be empty")
        if ref.version:
            return Resolved(self.version(ref.name, ref.version), ref.label, "")
        label = ref.label or DEFAULT_LABEL
        if label == LATEST:
            return Resolved(self.version(ref.name, self.latest(ref.name)), label, "")
        pointer = self.pointer(ref.name, label)
        chosen = assign(pointer, subject)
        variant = variant_name(chosen) if len(pointer.variants) > 1 else ""
        return Resolved(self.version(ref.name, chosen.version), label, variant)

    def labels_of(self, name: str, version: int) -> list[str]:
        return sorted(
            label
            for label, p in self.labels.get(name, {}).items()
            if any(v.version == version for v in p.variants)
        )

    def history(self, name: str) -> Sequence[templates_pb2.TemplateVersion]:
        versions = self._versions_of(name)
        return [versions[n].version for n in sorted(versions)]
