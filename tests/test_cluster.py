"""One Serve HTTP proxy per cluster: a second app asking for other settings is an error, not a silent warning."""

import pytest

from core.config import ConfigError
from job.cluster import start_serve


def test_an_app_joins_the_running_proxy_with_the_same_settings(serve_instance):
    port = int(serve_instance.rsplit(":", 1)[1])
    assert start_serve("127.0.0.1", port, 60) == serve_instance


def test_an_app_asking_for_another_port_is_refused_naming_its_keys(serve_instance):
    port = int(serve_instance.rsplit(":", 1)[1])
    with pytest.raises(ConfigError) as e:
        start_serve("127.0.0.1", port + 1, 60, section="reward_service")
    assert f"reward_service.port={port + 1}" in str(e.value) and f"running: {port}" in str(e.value)
    assert "reward_service.host" not in str(e.value)
