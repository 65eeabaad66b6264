"""compose/docker-compose.yml, checked without Docker: it parses, what it mounts
exists after compose/prepare.py, the distroless Headscale image is asked for
no shell and no missing program, Headscale's config is the native stack's, and
the pieces agree with each other (addresses, paths, ports, start order).

tests/integration/test_compose.py runs the same services natively.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.integration.compose_native import (
    COMPOSE_DIR,
    IMAGES,
    argv_of,
    depends_on,
    distroless_violations,
    environment,
    load_compose,
    load_prepare,
    mounts,
    rewrite_paths,
    start_order,
)
from tests.realstack import Stack

SPEC = load_compose()
SERVICES: dict[str, dict[str, Any]] = SPEC["services"]
prepare = load_prepare()


def service_networks(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): (v or {}) for k, v in (service.get("networks") or {}).items()}


def mount_target(service: dict[str, Any], source: str) -> str:
    [target] = [m.target for m in mounts(service) if m.source == source]
    return target


def test_compose_file_parses_into_the_promised_services() -> None:
    assert set(SERVICES) == {"headscale", "bootstrap", "ts1", "ts2", "web", "trionet"}
    assert SERVICES["headscale"]["image"].startswith("headscale/headscale:")
    assert SERVICES["ts1"]["image"] == SERVICES["ts2"]["image"]
    assert SERVICES["ts1"]["image"].startswith("tailscale/tailscale:")
    assert SERVICES["trionet"]["build"]["target"] == "trionet"
    assert start_order(SERVICES).index("headscale") < start_order(SERVICES).index("bootstrap")


def test_every_image_is_one_whose_contents_we_know() -> None:
    """A new image must be classified (shell or distroless) in IMAGES before it is used,
    including the Dockerfile's bases."""
    images = {str(svc["image"]) for svc in SERVICES.values() if "image" in svc}
    assert images <= set(IMAGES), images - set(IMAGES)
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.M))
    bases = {re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], b)
             for b in re.findall(r"^FROM (\S+)", dockerfile, re.M)}
    assert bases <= set(IMAGES), bases - set(IMAGES)


def test_no_distroless_service_runs_a_shell_or_a_missing_program() -> None:
    assert IMAGES[SERVICES["headscale"]["image"]].has_shell is False
    found = [v for name, svc in SERVICES.items() for v in distroless_violations(name, svc)]
    assert not found, found
    # The image's own entrypoint (ko: /ko-app/headscale) runs with `serve`, and the health
    # check execs `headscale health` by PATH (ko puts /ko-app on it).
    assert argv_of(SERVICES["headscale"]) == ["/ko-app/headscale", "serve"]
    assert SERVICES["headscale"]["healthcheck"]["test"] == ["CMD", "headscale", "health"]


def test_the_distroless_check_catches_what_the_old_compose_file_did() -> None:
    """The file this replaced ran `/bin/sh -c "sed ... && exec headscale serve"` in Headscale's
    image: the check must reject that, and a CMD-SHELL health check, and a missing tool."""
    old = {"image": "headscale/headscale:0.29.3", "entrypoint": ["/bin/sh", "-c"],
           "command": ["sed -e s#@IP@#10.213.0.1#g ... && exec headscale serve"]}
    assert len(distroless_violations("headscale", old)) == 2
    shell_check = {"image": "headscale/headscale:0.29.3", "command": ["serve"],
                   "healthcheck": {"test": ["CMD-SHELL", "headscale health"]}}
    assert len(distroless_violations("headscale", shell_check)) == 1
    curl_check = {"image": "headscale/headscale:0.29.3", "command": ["serve"],
                  "healthcheck": {"test": ["CMD", "curl", "-f", "https://10.213.0.1:8443/health"]}}
    assert len(distroless_violations("headscale", curl_check)) == 1


def test_rendered_headscale_config_is_the_native_stacks(tmp_path: Path) -> None:
    """Byte for byte what tests/realstack.py writes for the native stack, apart from the
    address and the paths the template leaves open."""
    native = Stack("0.29.3", workdir=tmp_path, subnet=77)  # renders only: no namespace is made
    native._write_headscale_config()
    native_text = native.hs_config.read_text()
    compose_text = prepare.compose_headscale_config()
    assert not re.search(r"@[A-Z]+@", compose_text)  # every placeholder filled
    as_compose = (native_text.replace(str(tmp_path / "hs"), prepare.HEADSCALE_DATA)
                  .replace(str(tmp_path / "tls"), prepare.TLS_DIR).replace(native.hs_host.ip, prepare.HEADSCALE_IP))
    assert as_compose == compose_text
    assert native_text != compose_text  # the substitutions above did something


def test_compose_config_paths_and_address_are_the_containers() -> None:
    """The rendered config's address and paths are where the compose file puts them."""
    hs = SERVICES["headscale"]
    assert service_networks(hs)["lan"]["ipv4_address"] == prepare.HEADSCALE_IP
    targets = {m.target for m in mounts(hs)}
    assert prepare.HEADSCALE_DATA in targets and prepare.TLS_DIR in targets
    config_target = mount_target(hs, "./headscale/config.yaml")
    assert environment(hs)["HEADSCALE_CONFIG"] == config_target
    assert environment(SERVICES["bootstrap"])["HEADSCALE_CONFIG"] == config_target
    server_url = f"https://{prepare.HEADSCALE_IP}:8443"
    assert f"--login-server={server_url}" in argv_of(SERVICES["trionet"])
    for peer in ("ts1", "ts2"):
        assert f"--login-server={server_url}" in environment(SERVICES[peer])["TS_EXTRA_ARGS"].split()


def test_prepare_writes_every_mounted_file_and_a_cert_for_headscale(tmp_path: Path) -> None:
    """After prepare (the wheel aside: the integration test builds it) every bind mount's
    source exists, and the server certificate names Headscale's compose address."""
    out = tmp_path / "compose"
    shutil.copytree(COMPOSE_DIR, out, ignore=shutil.ignore_patterns("tls", "dist", "config.yaml", "__pycache__"))
    prepare.prepare(out, wheel=False)
    binds = {m.source for svc in SERVICES.values() for m in mounts(svc) if m.is_bind}
    assert {"./headscale/config.yaml", "./tls", "./bootstrap.py", "./www"} <= binds
    assert [s for s in binds if not (out / s).exists()] == []
    assert (out / "headscale" / "config.yaml").read_text() == prepare.compose_headscale_config()
    cert = x509.load_pem_x509_certificate((out / "tls" / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address(prepare.HEADSCALE_IP) in sans.get_values_for_type(x509.IPAddress)
    before = (out / "tls" / "ca.crt").read_bytes()
    prepare.prepare(out, wheel=False)  # a second run keeps a pair that is still good
    assert (out / "tls" / "ca.crt").read_bytes() == before


def test_lan_is_internal_with_fixed_addresses_and_its_gateway_apart() -> None:
    lan = SPEC["networks"]["lan"]
    assert lan["internal"] is True
    [ipam] = lan["ipam"]["config"]
    subnet = ipaddress.ip_network(ipam["subnet"])
    addresses = [str(service_networks(svc)["lan"]["ipv4_address"]) for svc in SERVICES.values()
                 if "lan" in service_networks(svc)]
    assert len(addresses) == len(set(addresses)) == 4
    assert all(ipaddress.ip_address(a) in subnet for a in addresses)
    # Docker takes the gateway address for the host's end of the bridge: never a container's.
    assert ipam["gateway"] not in addresses and ipaddress.ip_address(ipam["gateway"]) in subnet


def test_trionet_cli_in_the_container_finds_the_daemons_state() -> None:
    """`docker compose exec trionet python -m trionet status` needs no --state-dir."""
    trionet = SERVICES["trionet"]
    state_dir = environment(trionet)["TRIONET_STATE_DIR"]
    assert f"--state-dir={state_dir}" in argv_of(trionet)
    assert mount_target(trionet, "trionet-state") == state_dir


def test_published_ports_reach_trionets_listeners_on_loopback_only() -> None:
    """Docker publishes nothing for a container only on internal networks (moby/moby#36174);
    the host side is 127.0.0.1; inside, trionet listens on 0.0.0.0 on the published ports."""
    for name, svc in SERVICES.items():
        ports = [str(p) for p in svc.get("ports", [])]
        if not ports:
            continue
        assert any(not (SPEC["networks"][n] or {}).get("internal") for n in service_networks(svc)), name
        assert all(p.startswith("127.0.0.1:") for p in ports), ports
    argv = argv_of(SERVICES["trionet"])
    listens = [a.split("=", 1)[1].split("=")[0] for a in argv if a.startswith(("--forward=", "--socks5="))]
    assert len(listens) == 2
    published = {p.rsplit(":", 1)[1] for p in SERVICES["trionet"]["ports"]}
    for listen in listens:
        bind, port = listen.rsplit(":", 1)
        assert bind == "0.0.0.0" and port in published


def test_the_key_is_read_only_after_the_bootstrap_made_it() -> None:
    """Whoever reads the auth key mounts its volume read-only and starts after the bootstrap
    exited 0; the bootstrap starts once Headscale is healthy, with Headscale's own CLI."""
    boot = SERVICES["bootstrap"]
    key_path = boot["command"][boot["command"].index("--out") + 1]
    key_dir = str(Path(key_path).parent)
    readers = [n for n, s in SERVICES.items()
               if key_path in " ".join([*argv_of(s), *environment(s).values()]) and n != "bootstrap"]
    assert sorted(readers) == ["trionet", "ts1", "ts2"]
    [volume] = [m.source for m in mounts(boot) if m.target == key_dir]
    for name in readers:
        [mount] = [m for m in mounts(SERVICES[name]) if m.source == volume]
        assert mount.target == key_dir and mount.read_only, name
        assert depends_on(SERVICES[name])["bootstrap"] == "service_completed_successfully", name
    assert depends_on(boot) == {"headscale": "service_healthy"}
    assert boot["build"]["args"]["HEADSCALE_IMAGE"] == SERVICES["headscale"]["image"]
    data = [m for m in mounts(SERVICES["headscale"]) if m.target == prepare.HEADSCALE_DATA]
    assert [(m.source, m.target, m.read_only) for m in mounts(boot) if m.target == prepare.HEADSCALE_DATA] == \
        [(data[0].source, prepare.HEADSCALE_DATA, True)]


@pytest.mark.parametrize(("text", "expected"), [
    ("/tls/ca.crt", "/h/tls/ca.crt"),
    ("file:/bootstrap/authkey", "file:/h/boot/authkey"),
    ("--statedir=/var/lib/tailscale", "--statedir=/h/ts"),
    ("/tlsx/ca.crt", "/tlsx/ca.crt"),
    ("/var/lib/tailscale-old", "/var/lib/tailscale-old"),
    ("https://10.213.0.1:8443", "https://10.213.0.1:8443"),
    ("/tmp/a /tls", "/h/tmp/a /h/tls"),  # one pass: /h/tmp is not rewritten again
])
def test_native_path_rewriting_takes_whole_path_components(text: str, expected: str) -> None:
    mapping = {"/tls": "/h/tls", "/bootstrap": "/h/boot", "/var/lib/tailscale": "/h/ts", "/tmp": "/h/tmp",
               "/h": "/never"}
    assert rewrite_paths(text, mapping) == expected
