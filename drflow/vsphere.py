"""vSphere reads shared by the tasks and the lab (pyvmomi, no Prefect): VMs by name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pyVmomi import vim, vmodl


def vm_names(si: Any, root: Any) -> Iterator[tuple[str, Any]]:
    """(name, VM) of every VM under folder `root`, in one PropertyCollector round trip (not one
    per VM), paged as vCenter pages it."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(root, [vim.VirtualMachine], True)
    try:
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                name="view", type=vim.view.ContainerView, path="view", skip=False)])],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["name"], all=False)],
        )
        result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        while result is not None:
            for obj in result.objects:
                yield next(str(p.val) for p in obj.propSet if p.name == "name"), obj.obj
            if not result.token:
                break
            result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
    finally:
        view.DestroyView()
