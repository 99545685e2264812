// The part of jStat (npm `jstat`, CommonJS, no bundled types) that ampipe uses: Student's t
// distribution, the normal CDF and log-gamma. The module's export is the jStat object itself.
declare module "jstat" {
  const jStat: {
    studentt: {
      cdf(x: number, dof: number): number;
      inv(p: number, dof: number): number;
    };
    normal: {
      cdf(x: number, mean: number, sd: number): number;
    };
    gammaln(x: number): number;
  };
  export default jStat;
}
