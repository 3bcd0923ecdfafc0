-- Who is connected to this database: workers, adds and retrieves by application name.
SELECT application_name, client_addr, state, count(*) AS connections,
       max(now() - state_change) AS longest_in_state
FROM pg_stat_activity WHERE datname = current_database()
GROUP BY 1, 2, 3 ORDER BY connections DESC;
