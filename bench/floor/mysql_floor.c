/*
 * The MySQL/MariaDB client library's own round trip for W(N)'s lazy
 * statement: what pgbench is for libpq (BENCHMARKS.md, "W(10,000) on
 * MySQL"). One connection, the statement prepared once, then executed
 * `count` times with a random parent id in 1..rows, each result stored
 * (mysql_stmt_store_result, as Diesel's MysqlConnection does) and read to
 * its end. Prints the mean microseconds per statement.
 *
 * Built by bench/mysql_floor.sh, run by `bench --mysql-floor <binary>`:
 *   MYSQL_PWD=<password> mysql_floor <host> <port> <user> <database> <rows> <count>
 */
#include <mysql.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *SQL = "SELECT id, a_id, data FROM b WHERE a_id = ?";

static void die(const char *what, const char *message) {
    fprintf(stderr, "mysql_floor: %s: %s\n", what, message);
    exit(1);
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s <host> <port> <user> <database> <rows> <count>\n", argv[0]);
        return 2;
    }
    int rows = atoi(argv[5]);
    long count = atol(argv[6]);
    if (rows < 1 || count < 1) {
        die("arguments", "rows and count must be positive");
    }

    const char *password = getenv("MYSQL_PWD");
    MYSQL *conn = mysql_init(NULL);
    if (!mysql_real_connect(conn, argv[1], argv[3], password ? password : "", argv[4],
                            (unsigned)atoi(argv[2]), NULL, 0)) {
        die("connect", mysql_error(conn));
    }
    MYSQL_STMT *stmt = mysql_stmt_init(conn);
    if (mysql_stmt_prepare(stmt, SQL, strlen(SQL))) {
        die("prepare", mysql_stmt_error(stmt));
    }

    int parent = 0;
    MYSQL_BIND param;
    memset(&param, 0, sizeof param);
    param.buffer_type = MYSQL_TYPE_LONG;
    param.buffer = &parent;
    if (mysql_stmt_bind_param(stmt, &param)) {
        die("bind_param", mysql_stmt_error(stmt));
    }

    int id = 0, a_id = 0;
    char data[4096];
    unsigned long data_length = 0;
    MYSQL_BIND out[3];
    memset(out, 0, sizeof out);
    out[0].buffer_type = MYSQL_TYPE_LONG;
    out[0].buffer = &id;
    out[1].buffer_type = MYSQL_TYPE_LONG;
    out[1].buffer = &a_id;
    out[2].buffer_type = MYSQL_TYPE_STRING;
    out[2].buffer = data;
    out[2].buffer_length = sizeof data;
    out[2].length = &data_length;
    /* is_null and error left NULL: the library keeps them in the bind
     * itself (their type is my_bool in libmariadb, bool in MySQL 8's). */
    if (mysql_stmt_bind_result(stmt, out)) {
        die("bind_result", mysql_stmt_error(stmt));
    }

    unsigned long long seed = 0x9E3779B97F4A7C15ULL, fetched = 0;
    double started = now_us();
    for (long i = 0; i < count; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        parent = (int)(seed % (unsigned long long)rows) + 1;
        if (mysql_stmt_execute(stmt)) {
            die("execute", mysql_stmt_error(stmt));
        }
        if (mysql_stmt_store_result(stmt)) {
            die("store_result", mysql_stmt_error(stmt));
        }
        int rc;
        while ((rc = mysql_stmt_fetch(stmt)) == 0 || rc == MYSQL_DATA_TRUNCATED) {
            fetched++;
        }
        if (rc != MYSQL_NO_DATA) {
            die("fetch", mysql_stmt_error(stmt));
        }
        mysql_stmt_free_result(stmt);
    }
    double elapsed = now_us() - started;
    printf("mysql_floor: %ld statements, %llu rows, %.1f us per statement\n", count, fetched,
           elapsed / (double)count);
    mysql_stmt_close(stmt);
    mysql_close(conn);
    return 0;
}
