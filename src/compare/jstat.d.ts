// The part of jStat (npm `jstat`, CommonJS, no bundled types) that ampipe uses: Student's t
// distribution. The module's export is the jStat object itself.
declare module "jstat" {
  const jStat: {
    studentt: {
      cdf(x: number, dof: number): number;
      inv(p: number, dof: number): number;
    };
  };
  export default jStat;
}
