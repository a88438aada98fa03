"""RabbitMQ as the broker (`make test-rabbitmq`): the campaign suites' real parts (a strict-front
simulator per module, worker subprocesses on the test database, Redis database and vhost)."""

from campaigns.pytest_fixtures import *  # noqa: F403  (sim, fresh_sim, worker_env, start_worker)
