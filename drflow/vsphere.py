"""vSphere access shared by the tasks, the gateway and the lab (pyvmomi, no Prefect): a login
bounded in time, VMs by name."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from http.client import HTTPConnection, HTTPSConnection
from typing import Any
from urllib.parse import urlparse
from xml.etree.ElementTree import ElementTree

from pydantic import SecretStr
from pyVim import connect as pyvim_connect
from pyVmomi import vim, vmodl
from pyVmomi.VmomiSupport import GetServiceVersions


def login(url: str, user: str, password: SecretStr, verify_tls: bool, timeout_s: float) -> Any:
    """A ServiceInstance of the vCenter at `url`, every round trip bounded by `timeout_s`.

    pyVmomi's SmartConnect first asks the server which API versions it speaks on a connection
    without any timeout: a vCenter that accepts TCP and never answers (hung vpxd, frozen VM)
    holds it for ever, whatever `httpConnectionTimeout` says. So the version is asked here, on
    a bounded connection, and the login goes through `Connect` with it. Errors never carry the
    password: they name the exception type only.
    """
    u = urlparse(url)
    https = u.scheme != "http"
    port = u.port or (443 if https else 80)
    path = u.path if u.path and u.path != "/" else "/sdk"
    context = None
    if https and not verify_tls:  # the operator's choice (vcenter.verify_tls: false)
        context = ssl._create_unverified_context()
    host = u.hostname or "localhost"
    try:
        version = _api_version(host, port, path, https, context, timeout_s)
        return pyvim_connect.Connect(
            host=host, port=port if https else -port, user=user,
            pwd=password.get_secret_value(), service="hostd", adapter="SOAP", path=path,
            version=version, sslContext=context, httpConnectionTimeout=timeout_s)
    except Exception as exc:  # never let the password ride along in a message
        raise ConnectionError(f"cannot log in to vCenter {user}@{url}: "
                              f"{type(exc).__name__}") from None


def _api_version(host: str, port: int, path: str, https: bool,
                 context: ssl.SSLContext | None, timeout_s: float) -> str:
    """The newest vim25 version both pyVmomi and the server speak (vimServiceVersions.xml)."""
    conn: HTTPConnection = (HTTPSConnection(host, port, timeout=timeout_s, context=context)
                            if https else HTTPConnection(host, port, timeout=timeout_s))
    try:
        conn.request("GET", path + "/vimServiceVersions.xml")
        response = conn.getresponse()
        if response.status != 200:
            raise ConnectionError(f"{host}:{port} answered HTTP {response.status}: not a vCenter")
        tree = ElementTree()
        tree.parse(response)
    finally:
        conn.close()
    supported = getattr(pyvim_connect, "__VersionIsSupported")  # pyVmomi's own reading of it
    for version in GetServiceVersions("vim25"):
        if supported(version, tree):
            return str(version)
    raise ConnectionError(f"{host}:{port} speaks no vim25 version this pyVmomi knows")


def vm_names(si: Any, root: Any) -> Iterator[tuple[str, Any]]:
    """(name, VM) of every VM under folder `root`, in one PropertyCollector round trip (not one
    per VM), paged as vCenter pages it."""
    for vm, props in vm_properties(si, root, ["name"]):
        yield str(props["name"]), vm


def vm_properties(si: Any, root: Any, paths: list[str]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(VM, {path: value}) of every VM under folder `root`, in one PropertyCollector round trip,
    paged as vCenter pages it; a property that is unset is absent from the dict."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(root, [vim.VirtualMachine], True)
    try:
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                name="view", type=vim.view.ContainerView, path="view", skip=False)])],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=paths, all=False)],
        )
        result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        while result is not None:
            for obj in result.objects:
                yield obj.obj, {p.name: p.val for p in obj.propSet or []}
            if not result.token:
                break
            result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
    finally:
        view.DestroyView()
