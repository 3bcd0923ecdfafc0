-- How many jobs a compute node finished in the last hour (the classic cr_hydra query).
-- Usage: psql "$URL" -v host=NODENAME -f sql/finished_last_hour.sql
select count(*) from inversions where datetime_finished >= NOW() - INTERVAL '1 HOURS' and status='finished' and inv_computer=:'host';
