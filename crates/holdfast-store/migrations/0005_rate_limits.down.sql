-- Undoes 0005_rate_limits.sql: rate-limit cells and known devices are gone (limits start
-- afresh; every browser is a stranger once).
DROP TABLE known_devices;
DROP TABLE rate_limits;
