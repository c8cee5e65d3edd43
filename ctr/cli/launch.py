"""How one service is served alone (`ctr serve --service NAME`, as a Kubernetes Deployment runs
it): the command and environment, its dependencies' URLs from the settings. Used by
`ctr serve` and by the local topology (`ctr.bench.cluster`); `ctr serve` imports nothing
from `ctr.bench`."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from ctr.api import bentoml_compat
from ctr.settings import PROJECT_ROOT

# `ctr serve --service` accepts the class names and BentoML's service names.
SERVICES = {"CTRGateway": "ctr_gateway", "FeatureService": "ctr_features", "FallbackService": "ctr_fallback",
            "CTRModel": "ctr_model"}  # fmt: skip


def service_name(name: str) -> str:
    if name in SERVICES:
        return SERVICES[name]
    if name in SERVICES.values():
        return name
    raise ValueError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")


def serve_command(name: str, host: str, port: int, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that serve one service alone (BentoML's standalone server,
    the image's `start-http-server`), its dependencies' URLs from the settings."""
    from ctr.settings import Settings

    def setting(field: str) -> str:
        return env.get(f"CTR_{field.upper()}", str(Settings.model_fields[field].default))

    svc = service_name(name)
    cmd = [*bentoml_compat.start_command(sys.executable, "service:CTRGateway"), f"--service-name={svc}",
           "--host", host, "--port", str(port),
           "--working-dir", str(PROJECT_ROOT)]  # fmt: skip
    out = dict(env)
    if svc == "ctr_model":  # the service graph holds CTRModel only while the gateway does not run the model itself
        out["CTR_MODEL_REPLICA"] = "in-graph"
    if svc == "ctr_gateway":
        urls = setting("model_urls")
        if not urls:
            raise ValueError("a gateway run alone needs CTR_MODEL_URLS (the model replicas)")
        first = urls.split(",")[0].strip()
        cmd += [f"--depends=ctr_model={first}", f"--depends=ctr_features={setting('features_url')}",
                f"--depends=ctr_fallback={setting('fallback_url')}"]  # fmt: skip
        # /readyz must not follow one model URL: the pool probes every replica itself
        opts = out.get("BENTOML_CONFIG_OPTIONS", "")
        out["BENTOML_CONFIG_OPTIONS"] = (opts + " " if opts else "") + "services.ctr_gateway.runner_probe.enabled=false"
    return cmd, out
