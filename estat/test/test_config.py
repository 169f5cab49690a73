# -*- test-case-name: estat.test.test_config -*-
"""
Tests for L{estat.config} and the twistd L{estat.tap.Options} built on it.
"""

from __future__ import annotations

import io
import ipaddress
import os
import sys

from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from estat.config import (
    SETTINGS,
    Config,
    ConfigError,
    load_config,
    parse_duration,
    parse_http_addr,
    read_dotenv,
)
from estat.tap import Options

#: The seed's table (section 4), as the text a user would write.  RAW_BUCKET
#: is only an example there; Estat's default is empty (the local store).
SEED_DEFAULTS = {
    "AWS_REGION": "ap-northeast-2",
    "RAW_BUCKET": "",
    "RAW_PREFIX": "raw",
    "DLQ_PREFIX": "raw_dlq",
    "HTTP_ADDR": ":8080",
    "MAX_BODY_SIZE": "16384",
    "CHANNEL_SIZE": "4000",
    "BATCH_SIZE": "5000",
    "FLUSH_INTERVAL": "120s",
    "S3_TIMEOUT": "3s",
    "S3_APP_RETRIES": "2",
    "DLQ_DIR": "/tmp/dlq",
    "DLQ_MAX_AGE": "24h",
    "DLQ_MAX_SIZE_BYTES": "19327352832",
}


def load(options=None, environ=None, dotenv=None) -> Config:
    return load_config(options or {}, environ or {}, dotenv or {})


def temp_path(case: SynchronousTestCase) -> str:
    """
    C{case.mktemp()}, removed again with the directories mktemp made for
    it, so runs from the project directory (pytest) leave nothing behind.
    """
    path = case.mktemp()

    def remove() -> None:
        if os.path.isfile(path):
            os.remove(path)
        try:
            os.removedirs(os.path.dirname(path))
        except OSError:
            pass

    case.addCleanup(remove)
    return path


class ParseDurationTests(SynchronousTestCase):
    """
    L{parse_duration} reads Go's C{time.ParseDuration} syntax as seconds.
    """

    def test_goForms(self) -> None:
        cases = {
            "3s": 3.0,
            "120s": 120.0,
            "2m": 120.0,
            "24h": 86400.0,
            "1h30m": 5400.0,
            "1.5s": 1.5,
            "250ms": 0.25,
            "0": 0.0,
            "1m30s": 90.0,
            "2h45m30.5s": 2 * 3600 + 45 * 60 + 30.5,
        }
        for text, seconds in cases.items():
            self.assertAlmostEqual(parse_duration(text), seconds, places=9, msg=text)

    def test_smallUnits(self) -> None:
        self.assertAlmostEqual(parse_duration("1500us"), 0.0015, places=12)
        self.assertAlmostEqual(parse_duration("1500\u00b5s"), 0.0015, places=12)
        self.assertAlmostEqual(parse_duration("2000000ns"), 0.002, places=12)

    def test_surroundingWhitespace(self) -> None:
        self.assertEqual(parse_duration(" 3s\n"), 3.0)

    def test_rejects(self) -> None:
        for text in ["soon", "", "   ", "-1s", "5", "1x", "s", "3s5", "1h 30m", "h1"]:
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_duration(text)


class DefaultsTests(SynchronousTestCase):
    """
    With nothing set, every setting has the seed's default.
    """

    def test_settingsTableMatchesSeed(self) -> None:
        table = {s.env: s.default for s in SETTINGS}
        for env, default in SEED_DEFAULTS.items():
            self.assertIn(env, table)
            self.assertEqual(table[env], default, env)

    def test_parsedDefaults(self) -> None:
        config = load()
        self.assertEqual(config.aws_region, "ap-northeast-2")
        self.assertEqual(config.raw_bucket, "")
        self.assertEqual(config.raw_prefix, "raw")
        self.assertEqual(config.dlq_prefix, "raw_dlq")
        self.assertEqual(config.http_addr, "tcp:8080")
        self.assertEqual(config.max_body_size, 16384)
        self.assertEqual(config.channel_size, 4000)
        self.assertEqual(config.batch_size, 5000)
        self.assertEqual(config.flush_interval, 120.0)
        self.assertEqual(config.s3_timeout, 3.0)
        self.assertEqual(config.s3_app_retries, 2)
        self.assertEqual(config.dlq_dir, "/tmp/dlq")
        self.assertEqual(config.dlq_max_age, 24 * 3600.0)
        self.assertEqual(config.dlq_max_size_bytes, 19327352832)
        self.assertEqual(config.dlq_max_size_bytes, 18 * 1024 ** 3)

    def test_defaultsClassMethod(self) -> None:
        """
        L{Config.defaults} is what L{load_config} gives with no input, with
        the overrides applied.
        """
        self.assertEqual(Config.defaults(), load())
        self.assertEqual(Config.defaults(batch_size=7).batch_size, 7)
        self.assertEqual(Config.defaults(batch_size=7).channel_size, 4000)

    def test_everySettingHasAnAttribute(self) -> None:
        config = load()
        for setting in SETTINGS:
            self.assertTrue(hasattr(config, setting.attribute), setting.env)
        self.assertEqual(len({s.env for s in SETTINGS}), len(SETTINGS))


class PrecedenceTests(SynchronousTestCase):
    """
    option > environment > .env > default.
    """

    def test_optionWins(self) -> None:
        config = load({"batch_size": "1"}, {"BATCH_SIZE": "2"}, {"BATCH_SIZE": "3"})
        self.assertEqual(config.batch_size, 1)

    def test_environmentBeatsDotenv(self) -> None:
        config = load({}, {"BATCH_SIZE": "2"}, {"BATCH_SIZE": "3"})
        self.assertEqual(config.batch_size, 2)

    def test_dotenvBeatsDefault(self) -> None:
        config = load({}, {}, {"BATCH_SIZE": "3"})
        self.assertEqual(config.batch_size, 3)

    def test_optionNoneMeansNotGiven(self) -> None:
        config = load({"batch_size": None}, {"BATCH_SIZE": "2"})
        self.assertEqual(config.batch_size, 2)

    def test_emptyOptionIsGiven(self) -> None:
        """
        An empty option is a value: it clears RAW_BUCKET set elsewhere.
        """
        config = load({"raw_bucket": ""}, {"RAW_BUCKET": "from-env"})
        self.assertEqual(config.raw_bucket, "")

    def test_sourcesAreIndependentPerSetting(self) -> None:
        config = load(
            {"batch_size": "11"},
            {"CHANNEL_SIZE": "22"},
            {"MAX_BODY_SIZE": "33", "BATCH_SIZE": "44", "CHANNEL_SIZE": "55"},
        )
        self.assertEqual(config.batch_size, 11)
        self.assertEqual(config.channel_size, 22)
        self.assertEqual(config.max_body_size, 33)
        self.assertEqual(config.flush_interval, 120.0)

    def test_environmentKeyIsTheVariableName(self) -> None:
        """
        The environment and C{.env} are keyed by the upper-case variable,
        options by the attribute; a lower-case environment name is not read.
        """
        self.assertEqual(load({}, {"batch_size": "9"}).batch_size, 5000)
        self.assertEqual(load({"BATCH_SIZE": "9"}).batch_size, 5000)

    def test_dotenvFileFeedsLoadConfig(self) -> None:
        path = temp_path(self)
        with open(path, "w") as f:
            f.write(
                "# comment\n"
                "export BATCH_SIZE=77\n"
                'FLUSH_INTERVAL="2m"\n'
                "RAW_PREFIX='events/raw' # trailing comment\n"
            )
        dotenv = read_dotenv(path)
        self.assertEqual(
            dotenv,
            {"BATCH_SIZE": "77", "FLUSH_INTERVAL": "2m", "RAW_PREFIX": "events/raw"},
        )
        config = load({}, {"BATCH_SIZE": "88"}, dotenv)
        self.assertEqual(config.batch_size, 88)
        self.assertEqual(config.flush_interval, 120.0)
        self.assertEqual(config.raw_prefix, "events/raw")


class ReadDotenvTests(SynchronousTestCase):
    def test_missingFileIsEmpty(self) -> None:
        self.assertEqual(read_dotenv(temp_path(self)), {})

    def test_emptyPathIsEmpty(self) -> None:
        self.assertEqual(read_dotenv(""), {})

    def test_keyWithoutValueIsLeftOut(self) -> None:
        path = temp_path(self)
        with open(path, "w") as f:
            f.write("BARE\nRAW_BUCKET=\nAWS_REGION=us-east-1\n")
        self.assertEqual(read_dotenv(path), {"RAW_BUCKET": "", "AWS_REGION": "us-east-1"})


class ConfigErrorTests(SynchronousTestCase):
    """
    A bad value raises L{ConfigError} whose message names the variable and
    the value, on one line.
    """

    def assertNamesSetting(self, env: str, value: str, source: str = "environment") -> str:
        with self.assertRaises(ConfigError) as cm:
            if source == "environment":
                load({}, {env: value})
            elif source == ".env":
                load({}, {}, {env: value})
            else:
                load({env.lower(): value})
        message = str(cm.exception)
        self.assertIn(env, message)
        self.assertIn(value, message)
        self.assertNotIn("\n", message)
        return message

    def test_batchSizeNotANumber(self) -> None:
        message = self.assertNamesSetting("BATCH_SIZE", "abc")
        self.assertIn("BATCH_SIZE='abc'", message)

    def test_flushIntervalNotADuration(self) -> None:
        self.assertNamesSetting("FLUSH_INTERVAL", "soon")

    def test_maxBodySizeNegative(self) -> None:
        self.assertNamesSetting("MAX_BODY_SIZE", "-5")

    def test_channelSizeZero(self) -> None:
        self.assertNamesSetting("CHANNEL_SIZE", "0")

    def test_zeroDurationRefusedWherePositiveNeeded(self) -> None:
        self.assertNamesSetting("FLUSH_INTERVAL", "0")
        self.assertNamesSetting("S3_TIMEOUT", "0s")

    def test_retriesMayBeZeroButNotNegative(self) -> None:
        self.assertEqual(load({}, {"S3_APP_RETRIES": "0"}).s3_app_retries, 0)
        self.assertNamesSetting("S3_APP_RETRIES", "-1")

    def test_sourceDoesNotMatter(self) -> None:
        self.assertNamesSetting("BATCH_SIZE", "abc", ".env")
        self.assertNamesSetting("BATCH_SIZE", "abc", "option")

    def test_badHttpAddr(self) -> None:
        self.assertNamesSetting("HTTP_ADDR", "nonsense")

    def test_valueWithNewlineStaysOneLine(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            load({}, {"BATCH_SIZE": "1\n2"})
        self.assertNotIn("\n", str(cm.exception))
        self.assertIn("BATCH_SIZE", str(cm.exception))

    def test_isValueError(self) -> None:
        self.assertTrue(issubclass(ConfigError, ValueError))


class OtherSettingsTests(SynchronousTestCase):
    """
    The parsers of Estat's own settings.
    """

    def test_prefixesLoseSlashes(self) -> None:
        config = load({}, {"RAW_PREFIX": "/raw/", "DLQ_PREFIX": "a/b/"})
        self.assertEqual(config.raw_prefix, "raw")
        self.assertEqual(config.dlq_prefix, "a/b")

    def test_emptyPrefixRefused(self) -> None:
        with self.assertRaises(ConfigError):
            load({}, {"RAW_PREFIX": "/"})

    def test_trustedProxies(self) -> None:
        config = load({}, {"TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7 fd00::/8"})
        self.assertEqual(
            config.trusted_proxies,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.168.1.7/32"),
                ipaddress.ip_network("fd00::/8"),
            ),
        )
        self.assertEqual(load().trusted_proxies, ())
        with self.assertRaises(ConfigError):
            load({}, {"TRUSTED_PROXIES": "not-a-network"})

    def test_gzipLevel(self) -> None:
        self.assertEqual(load({}, {"GZIP_LEVEL": "9"}).gzip_level, 9)
        for bad in ("0", "10"):
            with self.assertRaises(ConfigError):
                load({}, {"GZIP_LEVEL": bad})

    def test_workerNice(self) -> None:
        self.assertEqual(load().worker_nice, 0)
        self.assertEqual(load({}, {"WORKER_NICE": "10"}).worker_nice, 10)
        for bad in ("-1", "20", "x"):
            with self.assertRaises(ConfigError):
                load({}, {"WORKER_NICE": bad})

    def test_logFormat(self) -> None:
        self.assertEqual(load({}, {"LOG_FORMAT": "JSON"}).log_format, "json")
        with self.assertRaises(ConfigError):
            load({}, {"LOG_FORMAT": "xml"})

    def test_newSettingsDefaults(self) -> None:
        config = load()
        self.assertEqual(config.cors_allowed_origins, ())
        self.assertEqual(config.write_keys, ())
        self.assertIs(config.ip_anonymize, False)
        self.assertEqual(config.max_events_per_request, 500)

    def test_origins(self) -> None:
        config = load({}, {"CORS_ALLOWED_ORIGINS": "https://a.example.com/, http://b.example:8080"})
        self.assertEqual(config.cors_allowed_origins,
                         ("https://a.example.com", "http://b.example:8080"))
        self.assertEqual(load({}, {"CORS_ALLOWED_ORIGINS": "*"}).cors_allowed_origins, ("*",))
        for bad in ("a.example.com", "https://a.example.com/path", "ftp://a"):
            with self.assertRaises(ConfigError, msg=bad):
                load({}, {"CORS_ALLOWED_ORIGINS": bad})

    def test_writeKeys(self) -> None:
        self.assertEqual(load({}, {"WRITE_KEYS": " k1, k2 k3 "}).write_keys, ("k1", "k2", "k3"))

    def test_boolean(self) -> None:
        for text in ("1", "true", "YES", "on"):
            self.assertIs(load({}, {"IP_ANONYMIZE": text}).ip_anonymize, True, text)
        for text in ("0", "false", "No", "off", ""):
            self.assertIs(load({}, {"IP_ANONYMIZE": text}).ip_anonymize, False, text)
        with self.assertRaises(ConfigError):
            load({}, {"IP_ANONYMIZE": "maybe"})

    def test_addressingStyle(self) -> None:
        self.assertEqual(load({}, {"S3_ADDRESSING_STYLE": "Path"}).s3_addressing_style, "path")
        with self.assertRaises(ConfigError):
            load({}, {"S3_ADDRESSING_STYLE": "sideways"})


class ParseHttpAddrTests(SynchronousTestCase):
    """
    L{parse_http_addr} turns Go listen addresses into Twisted endpoint
    descriptions that Twisted can actually listen on.
    """

    def listen(self, description: str) -> tuple:
        """
        Listen on C{description} with a memory reactor and return the
        C{(port, interface)} that would have been bound.
        """
        reactor = MemoryReactor()
        endpoint = serverFromString(reactor, description)
        endpoint.listen(Factory())
        [(port, _factory, _backlog, interface)] = reactor.tcpServers
        return port, interface

    def test_portOnly(self) -> None:
        self.assertEqual(parse_http_addr(":8080"), "tcp:8080")
        self.assertEqual(self.listen(parse_http_addr(":8080")), (8080, ""))

    def test_ipv4Host(self) -> None:
        description = parse_http_addr("127.0.0.1:8080")
        self.assertEqual(description, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(self.listen(description), (8080, "127.0.0.1"))

    def test_ipv6Host(self) -> None:
        description = parse_http_addr("[::1]:8080")
        self.assertEqual(self.listen(description), (8080, "::1"))

    def test_localhost(self) -> None:
        self.assertEqual(self.listen(parse_http_addr("localhost:9000")), (9000, "127.0.0.1"))

    def test_twistedDescriptionPassesThrough(self) -> None:
        self.assertEqual(
            parse_http_addr("tcp:0:interface=127.0.0.1"), "tcp:0:interface=127.0.0.1")
        self.assertEqual(parse_http_addr("unix:/run/estat.sock"), "unix:/run/estat.sock")

    def test_shortTwistedDescriptionPassesThrough(self) -> None:
        """
        A Twisted description with only a port (C{tcp:8080}) is also a
        Twisted description, not a Go C{host:port} with host C{tcp}.
        """
        self.assertEqual(parse_http_addr("tcp:8080"), "tcp:8080")
        self.assertEqual(parse_http_addr("tcp6:8080"), "tcp6:8080")

    def test_rejects(self) -> None:
        for text in ["nonsense", "", ":", ":http", ":70000", "example.com:80",
                     "1.2.3.4", "[::1]", "999.1.1.1:80"]:
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_http_addr(text)


class OptionsTests(SynchronousTestCase):
    """
    L{Options} of C{twistd estat}.
    """

    def parse(self, *argv: str) -> Options:
        options = Options()
        # A .env file that does not exist, so the test's working directory
        # does not matter.
        options.parseOptions(["--env-file", temp_path(self), *argv])
        return options

    def test_optionValues(self) -> None:
        options = self.parse("--batch-size", "12", "--flush-interval=1h30m",
                             "--http-addr", "127.0.0.1:9090", "--raw-bucket", "b")
        self.assertEqual(options.config.batch_size, 12)
        self.assertEqual(options.config.flush_interval, 5400.0)
        self.assertEqual(options.config.http_addr, "tcp:9090:interface=127.0.0.1")
        self.assertEqual(options.config.raw_bucket, "b")

    def test_everySettingHasAnOption(self) -> None:
        """
        Passing every setting's default as its option gives the default
        configuration whatever the process environment holds: each setting
        has an option and options beat the environment.
        """
        argv = []
        for setting in SETTINGS:
            argv += ["--" + setting.option, setting.default]
        self.assertEqual(self.parse(*argv).config, Config.defaults())

    def test_helpListsEverySetting(self) -> None:
        usage = str(Options())
        for setting in SETTINGS:
            self.assertIn("--" + setting.option + "=", usage)
            self.assertIn(setting.env, usage)
        self.assertIn("--env-file=", usage)

    def test_envFileIsRead(self) -> None:
        path = temp_path(self)
        with open(path, "w") as f:
            f.write("GZIP_LEVEL=3\nSHUTDOWN_TIMEOUT=7s\n")
        for env in ("GZIP_LEVEL", "SHUTDOWN_TIMEOUT"):
            if env in os.environ:
                raise self.skipTest(f"{env} is set in the environment")
        options = Options()
        options.parseOptions(["--env-file", path, "--shutdown-timeout", "9s"])
        self.assertEqual(options.config.gzip_level, 3)
        self.assertEqual(options.config.shutdown_timeout, 9.0)

    def test_badValueExitsWithOneLine(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as cm:
            self.parse("--batch-size", "abc")
        self.assertEqual(cm.exception.code, 2)
        written = stderr.getvalue()
        self.assertEqual(written.count("\n"), 1)
        self.assertTrue(written.endswith("\n"))
        self.assertIn("BATCH_SIZE", written)
        self.assertIn("abc", written)

    def test_badDurationExitsWithOneLine(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as cm:
            self.parse("--flush-interval", "soon")
        self.assertEqual(cm.exception.code, 2)
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        self.assertIn("FLUSH_INTERVAL", stderr.getvalue())
        self.assertIn("soon", stderr.getvalue())
