//! Checks that a service a test needs is up, and fails the test (never skips
//! it) with the command that starts it when it is not.

use std::time::Duration;

/// A service on this machine that tests talk to.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// Human name, e.g. "PostgreSQL".
    pub name: &'static str,
    /// Environment variable that overrides the address.
    pub env: &'static str,
    /// Default `host:port`.
    pub default_addr: &'static str,
    /// The command that starts it.
    pub start: &'static str,
}

/// PostgreSQL on 127.0.0.1:5432.
pub const POSTGRES: Service = Service {
    name: "PostgreSQL",
    env: "POSTBOX_TEST_PG_ADDR",
    default_addr: "127.0.0.1:5432",
    start: "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
};
/// MariaDB on 127.0.0.1:3306.
pub const MARIADB: Service = Service {
    name: "MariaDB",
    env: "POSTBOX_TEST_MYSQL_ADDR",
    default_addr: "127.0.0.1:3306",
    start: "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
};
/// NATS with JetStream on 127.0.0.1:4222.
pub const NATS: Service = Service {
    name: "NATS (JetStream)",
    env: "POSTBOX_TEST_NATS_ADDR",
    default_addr: "127.0.0.1:4222",
    start: "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log",
};
/// RabbitMQ on 127.0.0.1:5672.
pub const RABBITMQ: Service = Service {
    name: "RabbitMQ",
    env: "POSTBOX_TEST_AMQP_ADDR",
    default_addr: "127.0.0.1:5672",
    start: "rabbitmq-server -detached",
};
/// Redis on 127.0.0.1:6379.
pub const REDIS: Service = Service {
    name: "Redis",
    env: "POSTBOX_TEST_REDIS_ADDR",
    default_addr: "127.0.0.1:6379",
    start: "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log",
};
/// Mosquitto MQTT on 127.0.0.1:1883.
pub const MQTT: Service = Service {
    name: "Mosquitto (MQTT)",
    env: "POSTBOX_TEST_MQTT_ADDR",
    default_addr: "127.0.0.1:1883",
    start: "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
};
/// Kafka (Tansu) on 127.0.0.1:9092, started by `scripts/test`.
pub const KAFKA: Service = Service {
    name: "Kafka (Tansu)",
    env: "POSTBOX_TEST_KAFKA_ADDR",
    default_addr: "127.0.0.1:9092",
    start: "scripts/services kafka",
};

impl Service {
    /// The address to use: the environment override or the default.
    pub fn addr(&self) -> String {
        std::env::var(self.env).unwrap_or_else(|_| self.default_addr.to_owned())
    }

    /// Returns the address once a TCP connection to it succeeds; panics
    /// (failing the test) with the start command otherwise.
    pub async fn require(&self) -> String {
        let addr = self.addr();
        let connect = tokio::net::TcpStream::connect(addr.as_str());
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => addr,
            Ok(Err(e)) => panic!(
                "{} is not reachable at {addr} ({e}). Start it with `{}` or run `scripts/test`, which starts what it needs.",
                self.name, self.start
            ),
            Err(_) => panic!(
                "{} at {addr} did not accept a connection within 5 s. Start it with `{}` or run `scripts/test`.",
                self.name, self.start
            ),
        }
    }
}
