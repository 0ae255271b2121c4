#!/usr/bin/env sysbench
-- A state change per transaction, for bench/protect.sh: each event sets a
-- user variable (COM_QUERY, a session-state change crash protection must
-- copy) and then runs one point select (a prepared statement answered
-- with rows, which changes nothing). Tables and options are
-- oltp_point_select's (`prepare` makes the table).

require("oltp_common")

function prepare_statements()
   sysbench.opt.point_selects = 1
   prepare_point_selects()
end

function event()
   con:query(string.format("SET @v = %d", sysbench.rand.uniform(1, 2147483647)))
   execute_point_selects()
end
