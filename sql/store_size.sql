-- How much disk the stored archives take (the classic cr_hydra query).
SELECT pg_size_pretty(pg_total_relation_size('binary_data'));
